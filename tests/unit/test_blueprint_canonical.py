"""The digest is the graph's identity: stable under form, different under any change of meaning."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from esper.blueprint import Graph, canonical_dict, canonical_json, digest, validate_source

SOURCE: dict[str, Any] = {
    "graph": {
        "inputs": [{"name": "x", "shape": ["batch", 16]}],
        "nodes": [
            {"id": "fc1", "op": "linear", "inputs": ["x"], "params": {"outFeatures": 32}},
            {"id": "act", "op": "gelu", "inputs": ["fc1"]},
            {"id": "fc2", "op": "linear", "inputs": ["act"], "params": {"outFeatures": 16}},
            {"id": "cat", "op": "concat", "inputs": ["x", "fc2"]},
            {"id": "out", "op": "scale", "inputs": ["cat"], "params": {"value": 2}},
        ],
        "outputs": ["out"],
    }
}


def d(source: dict[str, Any]) -> str:
    return digest(validate_source(source))


def reverse_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: reverse_keys(v) for k, v in reversed(list(value.items()))}
    if isinstance(value, list):
        return [reverse_keys(v) for v in value]
    return value


def test_canonical_json_is_compact_sorted_and_round_trips() -> None:
    g = validate_source(SOURCE)
    raw = canonical_json(g)
    assert b" " not in raw and b"\n" not in raw
    data = json.loads(raw)
    assert json.dumps(data, sort_keys=True, separators=(",", ":")).encode() == raw
    assert data == canonical_dict(g)
    assert Graph.model_validate(data) == Graph.model_validate(canonical_dict(Graph.model_validate(data)))
    assert len(digest(g)) == 64 and int(digest(g), 16) >= 0


def test_form_does_not_change_the_digest() -> None:
    base = d(SOURCE)
    assert d(reverse_keys(SOURCE)) == base
    assert d(json.loads(json.dumps(SOURCE, indent=4))) == base
    explicit = copy.deepcopy(SOURCE)
    nodes = explicit["graph"]["nodes"]
    nodes[0]["params"].update(bias=True, init="default")
    nodes[1]["params"] = {"approximate": "none"}
    nodes[3]["params"] = {"dim": -1}
    nodes[4]["params"]["value"] = 2.0  # an int and the same float are one value
    explicit["graph"]["dtype"] = "float32"
    assert d(explicit) == base
    shuffled = copy.deepcopy(SOURCE)
    shuffled["graph"]["nodes"].reverse()
    assert d(shuffled) == base


def test_template_and_its_expansion_share_a_digest() -> None:
    source = {"template": {"name": "residual-mlp", "params": {"features": 64, "blocks": 3}}}
    expanded = validate_source(source)
    as_graph = {"graph": expanded.model_dump()}
    assert d(as_graph) == d(source)
    as_graph["graph"]["nodes"] = sorted(as_graph["graph"]["nodes"], key=lambda n: n["id"], reverse=True)
    for n in as_graph["graph"]["nodes"]:  # omit the defaults again
        if n["op"] == "gelu":
            n["params"] = {}
    assert d(as_graph) == d(source)
    # Template params at their defaults, explicit or omitted, expand to the same graph.
    assert d(
        {"template": {"name": "residual-mlp", "params": {"features": 64, "blocks": 3, "hidden": 256}}}
    ) == d(source)


def edit(path: list[Any], value: Any) -> dict[str, Any]:
    source = copy.deepcopy(SOURCE)
    target = source["graph"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return source


@pytest.mark.parametrize(
    "changed",
    [
        edit(["nodes", 0, "params", "outFeatures"], 33),
        edit(["nodes", 0, "params", "bias"], False),
        edit(["nodes", 1, "op"], "relu"),
        edit(["nodes", 1, "params"], {"approximate": "tanh"}),
        edit(["nodes", 3, "inputs"], ["fc2", "x"]),  # input order is meaning
        edit(["nodes", 4, "params", "value"], 2.5),
        edit(["dtype"], "bfloat16"),
        edit(["inputs", 0, "name"], "h"),
        edit(["outputs"], ["cat"]),
    ],
    ids=[
        "outFeatures",
        "bias",
        "op",
        "gelu-approx",
        "input-order",
        "scale",
        "dtype",
        "input-name",
        "outputs",
    ],
)
def test_changes_of_meaning_change_the_digest(changed: dict[str, Any]) -> None:
    if changed["graph"]["inputs"][0]["name"] == "h":
        for n in changed["graph"]["nodes"]:
            n["inputs"] = ["h" if i == "x" else i for i in n["inputs"]]
    if changed["graph"]["outputs"] == ["cat"]:
        changed["graph"]["nodes"].pop()
    assert d(changed) != d(SOURCE)


def test_template_params_change_the_digest() -> None:
    a = d({"template": {"name": "lora-adapter", "params": {"rank": 8}}})
    b = d({"template": {"name": "lora-adapter", "params": {"rank": 4}}})
    c = d({"template": {"name": "lora-adapter", "params": {"rank": 8, "alpha": 8.0}}})
    assert len({a, b, c}) == 3


def test_digest_of_the_readme_example_is_pinned() -> None:
    """Kernel keys derive from this digest: a change here invalidates every stored kernel."""
    source = {"template": {"name": "residual-mlp", "params": {"features": 64, "hidden": 128, "blocks": 2}}}
    assert d(source) == "6b025cd22557e8c811ace0f888d1146e3773c6a5cec7804550a913f168083616"
