"""Every op's shape rule and parameter count, checked against the torch module it builds."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch

from esper.blueprint import OPS, build_module, output_shapes, param_count, validate_source
from esper.blueprint.torch_ops import BUILDERS
from esper.blueprint.validate import RESERVED_IDS


def one_op(op: str, shapes: list[list[Any]], params: dict[str, Any] | None = None) -> dict[str, Any]:
    """A graph with one node `y` reading inputs x0..xn."""
    names = [f"x{i}" for i in range(len(shapes))]
    return {
        "graph": {
            "inputs": [{"name": n, "shape": ["batch", *s]} for n, s in zip(names, shapes, strict=True)],
            "nodes": [{"id": "y", "op": op, "inputs": names, "params": params or {}}],
            "outputs": ["y"],
        }
    }


# (op, non-batch input shapes, params, expected non-batch output shape)
CASES: list[tuple[str, list[list[int]], dict[str, Any], list[int]]] = [
    ("linear", [[4, 6]], {"outFeatures": 3}, [4, 3]),
    ("linear", [[6]], {"outFeatures": 5, "bias": False}, [5]),
    ("conv1d", [[4, 10]], {"outChannels": 6, "kernelSize": 3}, [6, 8]),
    ("conv1d", [[4, 10]], {"outChannels": 8, "kernelSize": 3, "padding": "same", "groups": 4}, [8, 10]),
    ("conv2d", [[3, 9, 7]], {"outChannels": 5, "kernelSize": 3, "stride": 2, "padding": 1}, [5, 5, 4]),
    ("conv2d", [[4, 8, 8]], {"outChannels": 4, "kernelSize": 3, "dilation": 2}, [4, 4, 4]),
    ("batch_norm", [[5]], {}, [5]),
    ("batch_norm", [[5, 4, 4]], {"affine": False}, [5, 4, 4]),
    ("layer_norm", [[3, 8]], {}, [3, 8]),
    ("layer_norm", [[8]], {"bias": False}, [8]),
    ("rms_norm", [[3, 8]], {}, [3, 8]),
    ("relu", [[7]], {}, [7]),
    ("gelu", [[7]], {"approximate": "tanh"}, [7]),
    ("silu", [[2, 3]], {}, [2, 3]),
    ("tanh", [[7]], {}, [7]),
    ("sigmoid", [[7]], {}, [7]),
    ("dropout", [[7]], {"p": 0.5}, [7]),
    ("identity", [[2, 2]], {}, [2, 2]),
    ("scale", [[7]], {"value": -0.5}, [7]),
    ("add", [[4, 6], [4, 6]], {}, [4, 6]),
    ("add", [[4, 6], [1, 6]], {}, [4, 6]),
    ("mul", [[4, 1, 1], [4, 3, 3]], {}, [4, 3, 3]),
    ("concat", [[4, 2], [4, 3]], {}, [4, 5]),
    ("concat", [[1, 2], [3, 2], [2, 2]], {"dim": 1}, [6, 2]),
    ("reshape", [[4, 6]], {"shape": [2, -1, 3]}, [2, 4, 3]),
    ("reshape", [[24]], {"shape": [4, 6]}, [4, 6]),
    ("flatten", [[2, 3, 4]], {}, [24]),
    ("flatten", [[2, 3, 4]], {"startDim": 2}, [2, 12]),
    ("flatten", [[2, 3, 4, 5]], {"startDim": -3, "endDim": -2}, [2, 12, 5]),
    ("transpose", [[2, 3, 4]], {}, [2, 4, 3]),
    ("transpose", [[2, 3, 4]], {"dim0": 1, "dim1": 3}, [4, 3, 2]),
    ("matmul", [[2, 3, 4], [2, 4, 5]], {}, [2, 3, 5]),
    ("matmul", [[3, 4], [4, 2]], {}, [3, 2]),
    ("softmax", [[3, 5]], {"dim": 1}, [3, 5]),
    ("mean", [[3, 5]], {}, [3]),
    ("mean", [[3, 4, 5]], {"dims": [1, -1], "keepdim": True}, [1, 4, 1]),
    ("multihead_attention", [[6, 8]], {"heads": 2}, [6, 8]),
    ("multihead_attention", [[6, 8]], {"heads": 4, "causal": True, "bias": False}, [6, 8]),
    ("avg_pool2d", [[3, 8, 6]], {"kernelSize": 2}, [3, 4, 3]),
    ("max_pool2d", [[3, 7, 7]], {"kernelSize": 3, "stride": 2, "padding": 1}, [3, 4, 4]),
    ("adaptive_avg_pool2d", [[3, 8, 6]], {}, [3, 1, 1]),
    ("adaptive_avg_pool2d", [[3, 8, 6]], {"outputSize": [2, 3]}, [3, 2, 3]),
]


def test_registry_has_the_ops_the_design_names() -> None:
    assert len(OPS) >= 20
    assert set(OPS) == set(BUILDERS)
    covered = {c[0] for c in CASES}
    assert covered == set(OPS), f"ops without a shape case: {set(OPS) - covered}"


@pytest.mark.parametrize(("op", "shapes", "params", "expected"), CASES, ids=lambda v: str(v)[:30])
def test_shape_rule_matches_torch(
    op: str, shapes: list[list[int]], params: dict[str, Any], expected: list[int]
) -> None:
    graph = validate_source(one_op(op, shapes, params))
    assert output_shapes(graph) == [("batch", *expected)]
    module = build_module(graph, seed=1)
    out = module(*(torch.randn(2, *s) for s in shapes))
    assert tuple(out.shape) == (2, *expected)
    assert param_count(graph) == sum(p.numel() for p in module.parameters())


def test_params_are_closed_and_defaults_filled() -> None:
    for name, op in OPS.items():
        assert op.params.model_config.get("extra") == "forbid", name
        for key in op.params.model_fields:
            assert re.fullmatch(r"[a-z][A-Za-z0-9]*", key), f"{name}.{key} is not camelCase"
    graph = validate_source(one_op("conv2d", [[3, 8, 8]], {"outChannels": 4}))
    assert graph.nodes[0].params == {
        "outChannels": 4,
        "kernelSize": 3,
        "stride": 1,
        "padding": 0,
        "dilation": 1,
        "groups": 1,
        "bias": True,
        "init": "default",
    }
    pool = validate_source(one_op("max_pool2d", [[3, 8, 8]], {"kernelSize": 4}))
    assert pool.nodes[0].params["stride"] == 4  # a None default is resolved, so it digests as written


def test_reserved_ids_cover_module_attributes() -> None:
    """Node ids are submodule names; an id equal to a Module attribute would shadow it.

    torch's own attributes, read in a fresh interpreter: libraries imported by other tests add their
    own to nn.Module (transformers adds `smart_apply`).
    """
    code = "import torch; print(' '.join(dir(torch.nn.Module())))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names = {n for n in out.split() if re.fullmatch(r"[a-z][a-z0-9_]{0,62}", n)}
    assert names and names <= RESERVED_IDS


def test_package_imports_and_validates_without_torch() -> None:
    """The operator image has no torch: validation and digests must not import it."""
    code = textwrap.dedent(
        """
        import sys
        import esper.blueprint as bp
        g = bp.validate_source({"template": {"name": "conv-block"}})
        bp.digest(g); bp.param_count(g); bp.output_shapes(g)
        import esper.contracts
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
