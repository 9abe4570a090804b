"""Batch norm folded into its convolution while a kernel's programs are traced: same function, same
parameters, and only where nothing else reads the convolution's output."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from esper.blueprint import build_module, validate_source
from esper.tezzeret.folding import foldable_pairs, folded_batch_norms


def _graph(nodes: list[dict[str, Any]], outputs: list[str], shape: list[Any]) -> Any:
    return validate_source(
        {"graph": {"inputs": [{"name": "x", "shape": ["batch", *shape]}], "nodes": nodes, "outputs": outputs}}
    )


def _conv_block() -> torch.nn.Module:
    spec = {"template": {"name": "conv-block", "params": {"channels": 4, "height": 5, "width": 5}}}
    return build_module(validate_source(spec), seed=3).eval()


def _randomize_statistics(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, as a trained Blueprint would carry."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*module.named_buffers(), *module.named_parameters()]:
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.25)
            elif name.endswith(("running_mean", ".bias")) or "bn" in name:
                t.copy_(torch.randn(t.shape, generator=gen))


def _reference(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients of the unfolded module, in float64: independent of the folding."""
    ref = build_module(module.graph, seed=0).double().eval()
    ref.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
    xd = x.double().requires_grad_(True)
    out = ref(xd)
    out.backward(torch.ones_like(out))
    return out, {"x": xd.grad, **{n: p.grad for n, p in ref.named_parameters()}}


def test_each_convolution_read_only_by_its_batch_norm_is_folded() -> None:
    assert foldable_pairs(_conv_block()) == {"bn1": "conv1", "bn2": "conv2"}


def test_a_convolution_read_elsewhere_or_returned_is_not_folded() -> None:
    nodes = [
        {"id": "c1", "op": "conv2d", "inputs": ["x"], "params": {"outChannels": 3, "padding": 1}},
        {"id": "n1", "op": "batch_norm", "inputs": ["c1"]},
        {"id": "r1", "op": "relu", "inputs": ["c1"]},  # c1 has a second reader
        {"id": "s", "op": "add", "inputs": ["n1", "r1"]},
        {"id": "c2", "op": "conv2d", "inputs": ["s"], "params": {"outChannels": 3, "padding": 1}},
        {"id": "n2", "op": "batch_norm", "inputs": ["c2"]},
        {"id": "c3", "op": "conv2d", "inputs": ["n2"], "params": {"outChannels": 3, "padding": 1}},
        {"id": "n3", "op": "batch_norm", "inputs": ["c3"]},
    ]
    module = build_module(_graph(nodes, ["n3", "c2"], [3, 4, 4])).eval()  # c2 is a graph output
    assert foldable_pairs(module) == {"n3": "c3"}


def test_half_precision_blueprints_are_not_folded() -> None:
    spec = {"template": {"name": "conv-block", "params": {"channels": 4, "height": 5, "width": 5}}}
    graph = validate_source(spec).model_copy(update={"dtype": "bfloat16"})
    assert foldable_pairs(build_module(graph).eval()) == {}


def test_outside_eval_mode_or_a_blueprint_nothing_is_folded() -> None:
    module = _conv_block().train()
    with folded_batch_norms(module) as pairs:
        assert pairs == {} and "run" not in vars(module)
    plain = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3), torch.nn.BatchNorm2d(2)).eval()
    with folded_batch_norms(plain) as pairs:
        assert pairs == {}


def test_the_folded_block_computes_the_same_output_and_gradients() -> None:
    module = _conv_block()
    _randomize_statistics(module)
    x = torch.randn(6, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    want_out, want_grads = _reference(module, x)
    xf = x.clone().requires_grad_(True)
    with folded_batch_norms(module) as pairs:
        assert pairs
        out = module(xf)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    got = {"x": xf.grad, **{n: p.grad for n, p in module.named_parameters()}}
    assert got.keys() == want_grads.keys()  # the same parameters, under the same names
    for name, grad in got.items():
        torch.testing.assert_close(grad.double(), want_grads[name], atol=1e-4, rtol=1e-5, msg=name)
    assert "run" not in vars(module)  # the module evaluates unfolded again after the block
    assert not any("forward" in vars(node) for node in module.nodes.children())


@pytest.mark.parametrize(("bias", "affine"), [(False, True), (True, False), (False, False)])
def test_folding_without_a_convolution_bias_or_batch_norm_affine(bias: bool, affine: bool) -> None:
    nodes = [
        {
            "id": "c",
            "op": "conv1d",
            "inputs": ["x"],
            "params": {"outChannels": 5, "kernelSize": 3, "bias": bias},
        },
        {"id": "n", "op": "batch_norm", "inputs": ["c"], "params": {"affine": affine, "eps": 1e-3}},
    ]
    module = build_module(_graph(nodes, ["n"], [3, 7])).eval()
    _randomize_statistics(module, seed=2)
    x = torch.randn(4, 3, 7)
    want = F.batch_norm(
        F.conv1d(
            x.double(), module.nodes.c.weight.double(), None if not bias else module.nodes.c.bias.double()
        ),
        module.nodes.n.running_mean.double(),
        module.nodes.n.running_var.double(),
        None if not affine else module.nodes.n.weight.double(),
        None if not affine else module.nodes.n.bias.double(),
        False,
        0.1,
        1e-3,
    )
    with torch.no_grad(), folded_batch_norms(module) as pairs:
        assert pairs == {"n": "c"}
        torch.testing.assert_close(module(x).double(), want, atol=1e-5, rtol=1e-5)
