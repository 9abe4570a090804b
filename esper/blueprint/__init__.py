"""The Blueprint IR: typed seed architectures, validated without torch, built into modules with it.

`build_module` (the only part that needs torch) loads lazily, so the operator can import this package
in an image without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from esper.blueprint.canonical import canonical_dict, canonical_json, digest
from esper.blueprint.errors import BlueprintInvalid, Problem
from esper.blueprint.ir import BlueprintSource, Graph, Node, TemplateRef, TensorSpec
from esper.blueprint.opdef import Shape, ShapeError
from esper.blueprint.ops import OPS
from esper.blueprint.templates import TEMPLATES
from esper.blueprint.validate import (
    MAX_NODES,
    MAX_PARAMS,
    expand,
    output_shapes,
    param_count,
    validate_source,
)

if TYPE_CHECKING:  # pragma: no cover
    from esper.blueprint.builder import build_module

__all__ = [
    "MAX_NODES",
    "MAX_PARAMS",
    "OPS",
    "TEMPLATES",
    "BlueprintInvalid",
    "BlueprintSource",
    "Graph",
    "Node",
    "Problem",
    "Shape",
    "ShapeError",
    "TemplateRef",
    "TensorSpec",
    "build_module",
    "canonical_dict",
    "canonical_json",
    "digest",
    "expand",
    "output_shapes",
    "param_count",
    "validate_source",
]


def __getattr__(name: str) -> Any:
    if name == "build_module":
        from esper.blueprint.builder import build_module

        return build_module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
