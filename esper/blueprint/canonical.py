"""Canonical JSON and digest of a graph: the identity of what gets compiled.

The digest covers the expanded graph with every default filled in and nodes in a canonical order, so
a template and its expansion, key order, whitespace and omitted defaults all give the same digest.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from esper.blueprint.errors import BlueprintInvalid
from esper.blueprint.graphs import topo_order
from esper.blueprint.ir import Graph
from esper.blueprint.validate import fill_defaults


def canonical_graph(graph: Graph) -> Graph:
    """Defaults filled, nodes in topological order with ties broken by id."""
    filled, _, problems = fill_defaults(graph, "graph")
    if problems:
        raise BlueprintInvalid(problems)
    order, stuck = topo_order(filled.nodes)
    return filled.model_copy(update={"nodes": order + sorted(stuck, key=lambda n: n.id)})


def canonical_dict(graph: Graph) -> dict[str, Any]:
    """The canonical graph as plain JSON data (what manifests and Kernel specs store)."""
    return canonical_graph(graph).model_dump(mode="json")


def canonical_json(graph: Graph) -> bytes:
    """Sorted keys, no whitespace, ASCII: the same bytes for the same graph on every machine."""
    return json.dumps(
        canonical_dict(graph), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def digest(graph: Graph) -> str:
    """sha256 (hex) of the canonical JSON."""
    return hashlib.sha256(canonical_json(graph)).hexdigest()
