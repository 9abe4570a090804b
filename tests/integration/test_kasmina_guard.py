"""Every call into a real compiled kernel is checked before the kernel runs: shape, dtype, device,
layout; and what a seed slot does with a mismatch in each state and mode.

The kernel is the session's MLP (tests.support.kernels): input and output `[batch, 16]` float32 on
the CPU, maxBatch 64. A compiled package reads raw buffers, so any tensor it is not compiled for
would give garbage or an out-of-bounds read: the tests count the package's calls to show that a
refused tensor never reaches it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from esper.kasmina import (
    KasminaMetrics,
    KernelModule,
    KernelShapeError,
    KernelShapeWarning,
    SeedSlot,
    SeedState,
    load_kernel,
    wrap,
)
from tests.support.kernels import MAX_BATCH, F, reference_module

pytestmark = pytest.mark.slow
S = SeedState
KERNEL = f"(batch 1..{MAX_BATCH}, {F}) float32 on cpu"  # how messages spell the kernel's input


class Counting:
    """A package runner that counts its calls (and those of the runners that share it)."""

    def __init__(self, runner: Any, shared: Counting | None = None) -> None:
        self.runner = runner
        self.shared = shared
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.shared is not None:
            self.shared.calls += 1
        return self.runner(*args)


@pytest.fixture(scope="module")
def bundle(mlp_bundle: tuple[Path, str]) -> tuple[Path, str]:
    return mlp_bundle


def load(bundle: tuple[Path, str]) -> tuple[KernelModule, Counting, Counting]:
    """The kernel, and counters of its forward calls (inference or training package) and backward calls."""
    k = load_kernel(*bundle, metrics=KasminaMetrics(CollectorRegistry()))
    fwd, bwd = Counting(k.forward_runner), Counting(k.backward_runner)
    k.forward_runner, k.backward_runner = fwd, bwd
    k.train_forward_runner = Counting(k.train_forward_runner, shared=fwd)
    return k, fwd, bwd


WRONG: dict[str, tuple[Callable[[], Any], str, list[str]]] = {
    # case: (input, reason, substrings the message must contain besides the kernel's spec)
    "batch 0": (
        lambda: torch.randn(0, F),
        "ShapeMismatch",
        ["(0, 16) float32", "dim 0 (batch) is 0, outside 1..64"],
    ),
    "batch over maxBatch": (
        lambda: torch.randn(MAX_BATCH + 1, F),
        "ShapeMismatch",
        ["(65, 16) float32", "outside 1..64 (the kernel's compiled maxBatch)"],
    ),
    "feature dim": (lambda: torch.randn(4, 32), "ShapeMismatch", ["(4, 32) float32", "dim 1 is 32, not 16"]),
    "3-D input, 2-D kernel": (
        lambda: torch.randn(8, 32, F),
        "ShapeMismatch",
        ["(8, 32, 16) float32", "3 dims, not 2"],
    ),
    "extra trailing dim": (
        lambda: torch.randn(4, F, 1),
        "ShapeMismatch",
        ["(4, 16, 1) float32", "3 dims, not 2"],
    ),
    "4-D": (lambda: torch.randn(2, 2, 2, F), "ShapeMismatch", ["(2, 2, 2, 16) float32", "4 dims, not 2"]),
    "1-D": (lambda: torch.randn(F), "ShapeMismatch", ["(16,) float32", "1 dims, not 2"]),
    "float64": (lambda: torch.randn(4, F, dtype=torch.float64), "DTypeMismatch", ["(4, 16) float64"]),
    "float16": (lambda: torch.randn(4, F).half(), "DTypeMismatch", ["(4, 16) float16"]),
    "bfloat16": (lambda: torch.randn(4, F).bfloat16(), "DTypeMismatch", ["(4, 16) bfloat16"]),
    "int64": (lambda: torch.ones(4, F, dtype=torch.int64), "DTypeMismatch", ["(4, 16) int64"]),
    "meta device": (lambda: torch.empty(4, F, device="meta"), "DeviceMismatch", ["on meta"]),
    "sparse": (lambda: torch.randn(4, F).to_sparse(), "LayoutMismatch", ["torch.sparse_coo"]),
    "not a tensor": (lambda: [[0.0] * F] * 4, "ShapeMismatch", ["is a list"]),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_a_wrong_input_is_refused_before_the_kernel_runs(bundle: tuple[Path, str], case: str) -> None:
    k, fwd, _ = load(bundle)
    make, reason, parts = WRONG[case]
    with pytest.raises(KernelShapeError) as ei:
        k(make())
    e = ei.value
    msg = str(e)
    assert e.reason == reason and e.key == k.kernel_key and e.slot is None
    assert msg.startswith(f"{reason}: kernel {k.kernel_key[:16]}: input 0 (x) is ")
    assert f"the kernel takes {KERNEL}" in msg
    for part in parts:
        assert part in msg
    assert isinstance(e, ValueError)
    assert fwd.calls == 0


def test_input_count_and_mismatched_batches_are_refused(bundle: tuple[Path, str]) -> None:
    k, fwd, _ = load(bundle)
    with pytest.raises(KernelShapeError, match="takes 1 input"):
        k(torch.randn(4, F), torch.randn(4, F))
    # The backward's grad outputs go through the same check, with the forward call's batch bound.
    with pytest.raises(KernelShapeError) as ei:
        k._match([torch.randn(5, F)], k._out_expects, {"batch": 4})
    assert "grad output 0" in str(ei.value) and "batch is 4 elsewhere" in str(ei.value)
    with pytest.raises(KernelShapeError, match="DTypeMismatch"):
        k._match([torch.randn(4, F).double()], k._out_expects, {"batch": 4})
    assert fwd.calls == 0


def test_non_contiguous_inputs_are_copied_and_give_the_eager_result(bundle: tuple[Path, str]) -> None:
    k, fwd, bwd = load(bundle)
    ref = reference_module()
    for x in (
        torch.randn(F, 8).t(),  # transposed: (8, 16), strides (1, 8)
        torch.randn(8, 2 * F)[:, ::2],  # every other column
        torch.randn(1, F).expand(8, F),  # stride 0
    ):
        assert not x.is_contiguous()
        xk = x.detach().clone().requires_grad_() if x.stride(0) else x.detach().requires_grad_()
        yk = k(xk)
        torch.testing.assert_close(yk, ref(x.contiguous()), rtol=1e-5, atol=1e-5)
        yk.sum().backward()
        xr = x.contiguous().requires_grad_()
        ref(xr).sum().backward()
        assert xk.grad is not None and xr.grad is not None
        torch.testing.assert_close(xk.grad.contiguous(), xr.grad, rtol=1e-5, atol=1e-5)
        k.zero_grad()
    assert fwd.calls == 3 and bwd.calls == 3


def test_converted_parameters_are_refused_until_converted_back(bundle: tuple[Path, str]) -> None:
    k, fwd, _ = load(bundle)
    x = torch.randn(4, F)
    want = k(x).detach()
    k.double()  # what `model.double()` does to every submodule
    with pytest.raises(KernelShapeError) as ei:
        k(x)
    assert ei.value.reason == "DTypeMismatch" and "parameter " in str(ei.value)
    assert "float64" in str(ei.value) and "float32" in str(ei.value)
    k.float()
    assert torch.equal(k(x).detach(), want)
    sd = {n: t.double() for n, t in k.state_dict().items()}
    k.load_state_dict(sd, assign=True)  # replaces the parameters
    first, weight = next(iter(reference_module().named_parameters()))  # the manifest's first parameter
    with pytest.raises(KernelShapeError) as ei:
        k(x)
    shape = tuple(weight.shape)
    assert f"parameter {first} is {shape} float64 on cpu, the kernel takes {shape} float32 on cpu" in str(
        ei.value
    )
    k.load_state_dict({n: t.float() for n, t in sd.items()}, assign=True)
    assert torch.equal(k(x).detach(), want)
    assert fwd.calls == 3


# ---- seed slots --------------------------------------------------------------------------------


def metrics() -> KasminaMetrics:
    return KasminaMetrics(CollectorRegistry())


def skipped(m: KasminaMetrics, slot: str, reason: str) -> float:
    return (
        m.registry.get_sample_value("esper_seed_skipped_calls_total", {"seed": slot, "reason": reason}) or 0.0
    )


def grown(bundle: tuple[Path, str], state: SeedState) -> tuple[SeedSlot, KasminaMetrics, Counting]:
    """A slot around Linear(16, 16) that has seen `[4, 16]` and holds the kernel in `state`."""
    m = metrics()
    torch.manual_seed(0)
    slot = SeedSlot("s", nn.Linear(F, F), metrics=m)
    slot(torch.randn(4, F))
    k, fwd, _ = load(bundle)
    assert slot.germinate(k)
    if state is not S.GERMINATED:
        slot.start_training()
    if state in (S.BLENDING, S.FOSSILIZED):
        slot.start_blending(blend_steps=2)
        slot.step()  # alpha 0.5
    if state is S.FOSSILIZED:
        slot.fossilize()
    assert slot.state is state
    return slot, m, fwd


@pytest.mark.parametrize("state", [S.TRAINING, S.BLENDING, S.FOSSILIZED])
@pytest.mark.parametrize("mode", ["eval", "no_grad"])
def test_in_evaluation_a_mismatch_leaves_the_seed_out_and_is_recorded(
    bundle: tuple[Path, str], state: SeedState, mode: str
) -> None:
    slot, m, fwd = grown(bundle, state)
    host = slot.host
    assert host is not None
    if mode == "no_grad" and state is S.TRAINING:  # not run at all under no_grad: its output is y anyway
        x, calls = torch.randn(2, 32, F), fwd.calls
        with torch.no_grad():
            assert torch.equal(slot(x), host(x))
        assert fwd.calls == calls and slot.telemetry.skipped_calls == 0 and slot.state is state
        return
    if mode == "eval":
        slot.eval()
    calls = fwd.calls
    x = torch.randn(2, 32, F)  # a sequence the kernel was not compiled for: host output (2, 32, 16)
    with torch.no_grad() if mode == "no_grad" else torch.enable_grad():
        with pytest.warns(KernelShapeWarning, match=r"slot s: kernel .*\(2, 32, 16\) float32"):
            out = slot(x)
        assert torch.equal(out, host(x))  # the host's output, untouched by the seed
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per kernel: the second skip is only counted
            x2 = torch.randn(MAX_BATCH + 1, F)
            assert torch.equal(slot(x2), host(x2))
    assert fwd.calls == calls
    assert slot.state is state and slot.seed is not None
    assert slot.telemetry.skipped_calls == 2 and skipped(m, "s", "ShapeMismatch") == 2
    assert "(65, 16)" in (slot.telemetry.last_skip or "") and slot.status()["skippedCalls"] == 2
    slot.train()
    with torch.enable_grad():
        good = slot(torch.randn(4, F))  # a call that fits still runs the kernel
    assert good.shape == (4, F) and fwd.calls == calls + 1


@pytest.mark.parametrize("state", [S.TRAINING, S.BLENDING])
def test_in_training_a_mismatch_culls_a_live_seed(bundle: tuple[Path, str], state: SeedState) -> None:
    slot, _, fwd = grown(bundle, state)
    calls = fwd.calls
    x = torch.randn(8, 32, F)
    out = slot(x)
    assert slot.host is not None and torch.equal(out, slot.host(x))
    assert slot.state is S.CULLED and slot.seed is None and fwd.calls == calls
    reason = slot.lifecycle.history[-1].reason
    assert reason.startswith("ShapeMismatch: slot s: kernel ") and "(8, 32, 16) float32" in reason
    assert KERNEL in reason and slot.telemetry.last_error == reason


def test_in_training_a_mismatch_in_a_fossil_raises(bundle: tuple[Path, str]) -> None:
    slot, _, _ = grown(bundle, S.FOSSILIZED)
    with pytest.raises(KernelShapeError) as ei:
        slot(torch.randn(8, 32, F))
    assert ei.value.slot == "s" and "(8, 32, 16) float32" in str(ei.value) and KERNEL in str(ei.value)
    with pytest.raises(KernelShapeError, match="DTypeMismatch: slot s"):
        slot.double()(torch.randn(4, F, dtype=torch.float64))
    assert slot.state is S.FOSSILIZED and slot.seed is not None


def test_a_fossil_in_eval_runs_at_its_shape_and_skips_others(bundle: tuple[Path, str]) -> None:
    slot, _, _ = grown(bundle, S.FOSSILIZED)
    ref = reference_module()
    assert slot.host is not None
    slot.eval()
    with torch.no_grad():
        x = torch.randn(3, F)
        torch.testing.assert_close(slot(x), ref(slot.host(x)), rtol=1e-5, atol=1e-5)  # the fossil's output
        with pytest.warns(KernelShapeWarning):
            x1 = torch.randn(1, 1, F)  # one generated token: [1, 1, 16]
            assert torch.equal(slot(x1), slot.host(x1))


def test_a_wrong_kernel_on_an_unseen_slot_is_refused_at_its_first_call(bundle: tuple[Path, str]) -> None:
    m = metrics()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    bare = nn.Sequential(*[m_ for m_ in model])  # the same modules, no slot
    slot = wrap(model, at=["1"], metrics=m)["1"]
    k, fwd, _ = load(bundle)
    assert slot.germinate(k)  # nothing known about the slot yet
    assert slot.state is S.GERMINATED and not slot._passthrough
    x = torch.randn(4, 8)
    with torch.no_grad():
        want = bare(x)
    assert torch.equal(model(x), want)  # no kernel output ...
    assert slot.state is S.CULLED and slot.seed is None and fwd.calls == 0  # ... and the kernel is gone
    reason = slot.lifecycle.history[-1].reason
    assert reason.startswith("ShapeMismatch: slot 1: kernel ")
    assert "(batch 1..64, 16)" in reason and "(batch, 8)" in reason


def test_a_declared_shape_refuses_a_wrong_kernel_at_germination(bundle: tuple[Path, str]) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    slot = wrap(model, at=["1"], shapes={"1": (8,)}, metrics=metrics())["1"]
    k, fwd, _ = load(bundle)
    assert not slot.germinate(k)
    assert slot.state is S.DORMANT and slot.seed is None and fwd.calls == 0
    err = slot.telemetry.last_error or ""
    assert err.startswith("ShapeMismatch: slot 1: kernel ") and "(batch 1..64, 16)" in err
    assert not slot.germinate(bundle[0], expected_sha256=bundle[1])  # from the bundle: refused before loading
    assert slot.state is S.DORMANT and "ShapeMismatch" in (slot.telemetry.last_error or "")


def test_a_right_kernel_on_an_unseen_slot_is_checked_once_then_runs(bundle: tuple[Path, str]) -> None:
    model = nn.Sequential(nn.Linear(F, F), nn.Tanh())
    slot = wrap(model, at=["1"], shapes={"1": (F,)}, metrics=metrics())["1"]
    k, fwd, _ = load(bundle)
    assert slot.germinate(k) and slot._verify_due
    model.eval()
    with torch.no_grad(), pytest.warns(KernelShapeWarning):
        model(torch.randn(4, 2, F))  # an evaluation call that does not fit: counted, not culled
    assert slot.state is S.GERMINATED and slot._verify_due and slot.telemetry.skipped_calls == 1
    model.train()
    model(torch.randn(4, F))  # fits: the check (one probe call of the kernel) passes
    assert slot.state is S.GERMINATED and not slot._verify_due and slot._passthrough
    assert fwd.calls == 1
    slot.start_training()
    model(torch.randn(4, F)).sum().backward()
    assert fwd.calls == 2 and all(p.grad is not None for p in slot.seed_parameters())
