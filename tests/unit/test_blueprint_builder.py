"""Built modules: deterministic parameters, shapes as inferred, exportable with a dynamic batch."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from esper.blueprint import (
    TEMPLATES,
    BlueprintInvalid,
    Graph,
    build_module,
    output_shapes,
    param_count,
    validate_source,
)


def template_graph(name: str, **params: Any) -> Graph:
    return validate_source({"template": {"name": name, "params": params}})


def state_bytes(module: torch.nn.Module) -> dict[str, bytes]:
    return {
        k: v.detach().contiguous().view(torch.uint8).numpy().tobytes() for k, v in module.state_dict().items()
    }


def inputs_for(graph: Graph, batch: int, gen: torch.Generator | None = None) -> list[torch.Tensor]:
    return [torch.randn(batch, *[int(d) for d in t.shape[1:]], generator=gen) for t in graph.inputs]


def test_same_seed_gives_identical_parameters_and_global_rng_is_untouched() -> None:
    graph = template_graph("transformer-block", embed=32, heads=4, seq=4)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = state_bytes(build_module(graph, seed=7))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # a different global state must not matter
    b = state_bytes(build_module(graph, seed=7))
    assert a == b
    c = state_bytes(build_module(graph, seed=8))
    assert a.keys() == c.keys() and a != c


def test_parameter_names_and_order_are_stable() -> None:
    m = build_module(template_graph("bottleneck", features=16, bottleneck=4))
    assert [n for n, _ in m.named_parameters()] == [
        "nodes.down.weight",
        "nodes.down.bias",
        "nodes.up.weight",
        "nodes.up.bias",
    ]
    bn = build_module(template_graph("conv-block", channels=4, height=4, width=4))
    assert "nodes.bn1.running_mean" in bn.state_dict()


def test_node_order_in_the_source_does_not_change_the_module() -> None:
    graph = template_graph("residual-mlp", features=16, hidden=32)
    shuffled = graph.model_copy(update={"nodes": list(reversed(graph.nodes))})
    assert state_bytes(build_module(graph, 3)) == state_bytes(build_module(shuffled, 3))


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_builds_and_runs(name: str) -> None:
    graph = template_graph(name)
    assert len(graph.inputs) == 1
    module = build_module(graph, seed=0)
    (x,) = inputs_for(graph, 3)
    x.requires_grad_(True)
    out = module(x)
    (shape,) = output_shapes(graph)
    assert tuple(out.shape) == (3, *shape[1:])
    if name != "mlp":  # seeds keep the shape of the activation they read
        assert out.shape == x.shape
    assert param_count(graph) == sum(p.numel() for p in module.parameters())
    out.square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in module.parameters())


def test_lora_zero_init_starts_as_identity_or_zero_delta() -> None:
    x = torch.randn(2, 16)
    residual = build_module(template_graph("lora-adapter", features=16, rank=4, zeroInit=True))
    assert torch.equal(residual(x), x)  # a seed that starts exactly as the activation it replaces
    delta = build_module(template_graph("lora-adapter", features=16, rank=4, zeroInit=True, residual=False))
    assert torch.count_nonzero(delta(x)) == 0


def test_multiple_inputs_and_outputs() -> None:
    graph = validate_source(
        {
            "graph": {
                "inputs": [{"name": "a", "shape": ["batch", 4]}, {"name": "b", "shape": ["batch", 4]}],
                "nodes": [
                    {"id": "s", "op": "add", "inputs": ["a", "b"]},
                    {"id": "p", "op": "mul", "inputs": ["a", "b"]},
                ],
                "outputs": ["s", "p", "a"],
            }
        }
    )
    m = build_module(graph)
    assert list(inspect.signature(m.forward).parameters) == ["a", "b"]
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    s, p, same = m(a, b)
    assert torch.equal(s, a + b) and torch.equal(p, a * b) and same is a


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_dtype_sets_parameter_dtype(dtype: str, torch_dtype: torch.dtype) -> None:
    graph = template_graph("mlp", features=8, hidden=8).model_copy(update={"dtype": dtype})
    m = build_module(graph)
    assert {p.dtype for p in m.parameters()} == {torch_dtype}
    assert m(torch.randn(2, 8, dtype=torch_dtype)).dtype == torch_dtype


def test_invalid_graph_is_refused() -> None:
    graph = template_graph("mlp", features=8, hidden=8)
    broken = graph.model_copy(update={"outputs": ["nope"]})
    with pytest.raises(BlueprintInvalid, match="unknown output"):
        build_module(broken)


@pytest.mark.parametrize(
    ("name", "params", "train"),
    [
        ("residual-mlp", {"features": 32, "hidden": 64}, True),
        ("attention-block", {"embed": 32, "heads": 4, "seq": 8}, True),
        ("conv-block", {"channels": 8, "height": 6, "width": 6}, False),
    ],
)
def test_exports_with_dynamic_batch(name: str, params: dict[str, Any], train: bool) -> None:
    graph = template_graph(name, **params)
    module = build_module(graph, seed=1).train(train)
    gen = torch.Generator().manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(module, tuple(inputs_for(graph, 4, gen)), dynamic_shapes=({0: batch},))
    run = exported.module()
    for b in (1, 5):
        xs = inputs_for(graph, b, gen)
        torch.testing.assert_close(run(*xs), module(*xs), rtol=1e-5, atol=1e-5)
