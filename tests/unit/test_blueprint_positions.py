"""Which Blueprints mix positions and which are causal (the flag a language model's slots check)."""

from __future__ import annotations

from typing import Any

import pytest

from esper.blueprint import validate_source
from esper.blueprint.positions import positions


def graph(name: str, **params: Any) -> Any:
    return validate_source({"template": {"name": name, "params": params}})


@pytest.mark.parametrize(
    ("template", "params", "mixes", "causal"),
    [
        ("mlp", {}, False, True),  # [batch, F]: no positions at all
        ("lora-adapter", {}, False, True),
        ("transformer-mlp", {"seq": 8}, False, True),  # [batch, T, F], every op on the last dim
        ("attention-block", {}, True, False),  # the default lets a position see later ones
        ("attention-block", {"causal": True}, True, True),
        ("transformer-block", {"causal": True}, True, True),
        ("transformer-block", {}, True, False),
        ("conv-block", {}, True, False),
        ("squeeze-excitation", {}, True, False),
    ],
)
def test_templates(template: str, params: dict[str, Any], mixes: bool, causal: bool) -> None:
    p = positions(graph(template, **params))
    assert (p.mixesPositions, p.causal) == (mixes, causal)


def seq_graph(op: str, **params: Any) -> Any:
    node = {"id": "n", "op": op, "inputs": ["x"], "params": params}
    return validate_source(
        {"graph": {"inputs": [{"name": "x", "shape": ["batch", 8, 16]}], "nodes": [node], "outputs": ["n"]}}
    )


@pytest.mark.parametrize(
    ("op", "params", "mixes"),
    [
        ("softmax", {"dim": -1}, False),
        ("softmax", {"dim": 2}, False),  # the last dim, spelled positively
        ("softmax", {"dim": 1}, True),  # over the positions: every output sees every position
        ("mean", {"dims": [-1], "keepdim": True}, False),
        ("mean", {"dims": [1], "keepdim": True}, True),
        ("transpose", {"dim0": 1, "dim1": 2}, True),
    ],
)
def test_last_dim_ops_mix_only_off_the_last_dim(op: str, params: dict[str, Any], mixes: bool) -> None:
    p = positions(seq_graph(op, **params))
    assert (p.mixesPositions, p.causal) == (mixes, not mixes)
