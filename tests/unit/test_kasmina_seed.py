"""Seed slots: identity when dormant, isolation when training, exact convex blending, checkpoints."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from esper.kasmina import (
    EagerKernel,
    IllegalTransition,
    KasminaMetrics,
    KernelRestoreError,
    KernelShapeError,
    KernelShapeWarning,
    SeedSlot,
    SeedState,
    set_kernel_resolver,
    slots,
    status_json,
    step_slots,
    wrap,
)

S = SeedState
F = 16


class Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(F, F), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(F, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def make_seed(seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(F, 32), nn.GELU(), nn.Linear(32, F))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def pair(**opts: object) -> tuple[nn.Module, nn.Module, dict[str, SeedSlot]]:
    torch.manual_seed(0)
    bare = Host()
    wrapped = copy.deepcopy(bare)
    return bare, wrapped, wrap(wrapped, at=["blocks.0", "blocks.1"], **opts)


def metrics() -> KasminaMetrics:
    return KasminaMetrics(CollectorRegistry())


def host_grads(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace(".host", ""): p.grad.clone() for n, p in m.named_parameters() if ".seed." not in n}


def test_dormant_is_bit_identical_and_takes_the_fast_path() -> None:
    bare, wrapped, ss = pair()
    for _ in range(3):
        x = torch.randn(7, F)
        assert torch.equal(bare(x), wrapped(x))
    assert all(s._passthrough for s in ss.values())  # after the first (observing) forward: one check
    explicit = SeedSlot("free", metrics=metrics())
    x = torch.randn(3, F)
    assert explicit(x) is x and explicit(x) is x and explicit._passthrough
    assert ss["blocks.0"].telemetry.activation_shape == (F,)
    assert ss["blocks.0"].telemetry.samples == 1  # the first forward also takes one mean/std sample


def test_dormant_step_is_cheap_and_samples_rarely() -> None:
    _, wrapped, ss = pair(idle_sample_every=100)
    slot = ss["blocks.0"]
    x = torch.randn(4, F)
    wrapped(x)
    for step in range(1, 250):
        slot.step()
        assert slot.global_step == step and slot.steps_in_state == step
        assert slot._passthrough is (step not in (100, 200))  # observe at the next forward
        wrapped(x)
    assert slot.telemetry.samples == 3  # first forward, steps 100 and 200
    assert "_c" not in slot._modules and "global_step" not in slot.__dict__  # plain counters
    assert slot.state is S.DORMANT and torch.equal(wrapped(x), wrapped(x))


def test_step_slots_sees_slots_created_after_its_first_call() -> None:
    _, model, ss = pair()
    step_slots(model)
    assert [s.global_step for s in ss.values()] == [1, 1]
    model.head = SeedSlot("head", model.head, metrics=metrics())
    step_slots(model)
    assert [s.global_step for s in slots(model).values()] == [2, 2, 1]


def test_steps_in_state_and_checkpoint_counters_round_trip() -> None:
    _, model, ss = pair(blend_steps=10)
    slot = ss["blocks.0"]
    for _ in range(5):
        slot.step()
    slot.germinate(make_seed(), key="k")
    slot.start_training()
    for _ in range(3):
        slot.step()
    slot.start_blending()
    for _ in range(4):
        slot.step()
    assert (slot.global_step, slot.steps_in_state, slot.blend_step, slot.alpha) == (12, 4, 4, 0.4)
    extra = slot.slot_state()
    assert (extra["globalStep"], extra["stepsInState"], extra["blendStep"], extra["alpha"]) == (12, 4, 4, 0.4)
    _, fresh, fs = pair(blend_steps=10)
    set_kernel_resolver(fresh, lambda key: EagerKernel(make_seed(), key))
    fresh.load_state_dict(model.state_dict())
    r = fs["blocks.0"]
    assert (r.global_step, r.steps_in_state, r.blend_step, r.alpha, r.state) == (12, 4, 4, 0.4, S.BLENDING)
    r.step()
    assert (r.global_step, r.steps_in_state, r.alpha) == (13, 5, 0.5)
    x = torch.randn(3, F)
    y = r.host(x)
    assert torch.equal(r(x), y + 0.5 * (r.seed(y) - y))


def test_training_is_isolated_but_the_seed_learns() -> None:
    bare, wrapped, ss = pair()
    slot = ss["blocks.1"]
    assert slot.germinate(make_seed()) and slot.state is S.GERMINATED
    slot.start_training()
    x, t = torch.randn(9, F), torch.randn(9, 1)
    out_b, out_w = bare(x), wrapped(x)
    assert torch.equal(out_b, out_w)
    nn.functional.mse_loss(out_b, t).backward()
    nn.functional.mse_loss(out_w, t).backward()
    gb, gw = host_grads(bare), host_grads(wrapped)
    assert gb.keys() == gw.keys() and all(torch.equal(gb[k], gw[k]) for k in gb)
    seed_grads = [p.grad for p in slot.seed_parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in seed_grads)
    with torch.no_grad():  # evaluation does not even run the seed
        assert torch.equal(bare(x), wrapped(x))


def test_training_output_allows_inplace_ops_downstream() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    slot.germinate(make_seed())
    slot.start_training()
    net = nn.Sequential(slot, nn.ReLU(inplace=True), nn.Linear(F, 1))
    net(torch.randn(4, F)).sum().backward()
    assert all(p.grad is not None for p in slot.seed_parameters())


def test_a_nonfinite_training_seed_cannot_reach_the_host() -> None:
    bare, wrapped, ss = pair()
    bad = make_seed()
    with torch.no_grad():
        bad[2].bias.fill_(math.inf)
    ss["blocks.0"].germinate(bad)
    ss["blocks.0"].start_training()
    x = torch.randn(4, F)
    assert torch.equal(bare(x), wrapped(x))


def test_blending_schedule_and_exact_math() -> None:
    _, wrapped, ss = pair(blend_steps=4)
    slot = ss["blocks.0"]
    slot.germinate(make_seed())
    slot.start_training()
    slot.start_blending()
    alphas = [slot.alpha]
    for _ in range(6):
        slot.step()
        alphas.append(slot.alpha)
    assert alphas == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert slot.state is S.BLENDING  # at alpha 1 until someone decides
    slot.alpha = 0.25
    x = torch.randn(5, F)
    y = slot.host(x)
    s = slot.seed(y)
    assert torch.equal(slot(x), y + 0.25 * (s - y))  # convex: (1 - alpha) y + alpha s
    slot.alpha = 1.0
    assert torch.equal(slot(x), s)  # blended in: the seed's output replaces y
    slot.alpha = 0.25
    out = wrapped(x).sum()
    out.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in slot.seed_parameters())
    assert slot.host[0].weight.grad is not None


def test_blending_gradients_reach_host_through_the_seed() -> None:
    bare, wrapped, ss = pair(blend_steps=2)
    slot = ss["blocks.0"]
    slot.germinate(make_seed())
    slot.start_training()
    slot.start_blending()
    slot.step()
    x = torch.randn(6, F)
    bare(x).sum().backward()
    wrapped(x).sum().backward()
    assert not torch.equal(bare.blocks[0][0].weight.grad, wrapped.blocks[0].host[0].weight.grad)


def test_alpha_override_and_fossilized_math() -> None:
    _, _, ss = pair(blend_steps=1)
    slot = ss["blocks.0"]
    slot.germinate(make_seed())
    slot.start_training()
    slot.start_blending()
    slot.step()
    slot.fossilize()
    x = torch.randn(3, F)
    y, s = slot.host(x), slot.seed(slot.host(x))
    assert torch.equal(slot(x), s)  # a fossil computes s, not y + s
    with slot.alpha_override(0.0):
        assert torch.equal(slot(x), y)
    with slot.alpha_override(0.5):
        assert torch.equal(slot(x), y + 0.5 * (s - y))
    with slot.alpha_override(1.0):
        assert torch.equal(slot(x), s)
    assert torch.equal(slot(x), s)


class Residual(nn.Module):
    """x + f(x) with f's last layer at zero: what most Blueprint templates look like, at init."""

    def __init__(self) -> None:
        super().__init__()
        self.f = make_seed()
        nn.init.zeros_(self.f[2].weight)
        nn.init.zeros_(self.f[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


def test_a_residual_seed_blends_from_the_identity_and_does_not_double_y() -> None:
    bare, wrapped, ss = pair(blend_steps=3)
    slot = ss["blocks.0"]
    slot.germinate(Residual())
    slot.start_training()
    slot.start_blending()
    x = torch.randn(4, F)
    for _ in range(4):  # alpha 0, 1/3, 2/3, 1: s == y at init, so every blend is the host itself
        torch.testing.assert_close(wrapped(x), bare(x), rtol=0, atol=1e-6)
        slot.step()
    slot.fossilize()
    torch.testing.assert_close(wrapped(x), bare(x), rtol=0, atol=1e-6)  # y + f(y) = y, not 2y


def test_illegal_slot_operations_raise() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    with pytest.raises(IllegalTransition):
        slot.fossilize()
    with pytest.raises(IllegalTransition):
        slot.start_blending()
    slot.germinate(make_seed())
    with pytest.raises(IllegalTransition):
        slot.germinate(make_seed())


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> float:
    loss = torch.tensor(0.0)
    for _ in range(n):
        x = torch.randn(8, F)
        loss = (model(x) - x.sum(1, keepdim=True).sin()).pow(2).mean()
        loss.backward()
        opt.step()
        step_slots(model)
        opt.zero_grad()
    return float(loss.detach())


def grow_and_fossilize(model: nn.Module, slot: SeedSlot, opt: torch.optim.Optimizer) -> None:
    assert slot.germinate(make_seed(3), key="mlp16")
    opt.add_param_group(slot.param_group(lr=0.01))
    slot.start_training()
    train_steps(model, opt, 3)
    slot.start_blending(blend_steps=2)
    train_steps(model, opt, 2)
    slot.fossilize()
    train_steps(model, opt, 2)


def test_hot_load_between_steps_keeps_training() -> None:
    _, model, ss = pair()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    assert math.isfinite(train_steps(model, opt, 3))
    grow_and_fossilize(model, ss["blocks.1"], opt)
    assert math.isfinite(train_steps(model, opt, 3))


def test_deferred_germination_swaps_at_the_step_boundary() -> None:
    _, model, ss = pair()
    slot = ss["blocks.0"]
    x = torch.randn(4, F)
    out = model(x).sum()  # a step is in flight
    assert slot.germinate(make_seed(), defer=True)
    assert slot.state is S.DORMANT and slot.seed is None
    out.backward()
    slot.step()
    assert slot.state is S.GERMINATED and slot.seed is not None


def test_fossilized_seed_survives_a_checkpoint() -> None:
    _, model, ss = pair()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    grow_and_fossilize(model, ss["blocks.1"], opt)
    sd = model.state_dict()
    extra = sd["blocks.1._extra_state"]
    assert extra.dtype == torch.uint8  # JSON bytes in a tensor: safetensors can save it, no pickle
    assert json.loads(bytes(extra.tolist()))["kernelKey"] == "mlp16"
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)

    torch.manual_seed(123)
    fresh = Host()
    fresh_slots = wrap(fresh, at=["blocks.0", "blocks.1"])
    with pytest.raises(KernelRestoreError, match="kernel_resolver"):
        fresh.load_state_dict(sd)
    set_kernel_resolver(fresh, lambda key: EagerKernel(make_seed(99), key))
    fresh.load_state_dict(sd)  # strict
    assert list(fresh.state_dict()) == list(sd)
    restored = fresh_slots["blocks.1"]
    assert restored.state is S.FOSSILIZED and restored.kernel_key == "mlp16"
    assert restored.lifecycle.history == ss["blocks.1"].lifecycle.history
    x = torch.randn(5, F)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_refused_kernels_leave_the_slot_dormant() -> None:
    m = metrics()
    _, model, _ = pair(metrics=m)
    ss = slots(model)
    model(torch.randn(2, F))  # the slots learn their activation shape

    def broken() -> nn.Module:
        raise OSError("disk on fire")

    assert not ss["blocks.0"].germinate(broken)
    assert not ss["blocks.0"].germinate(nn.Linear(8, 8))  # does not fit a 16-wide activation
    assert ss["blocks.0"].state is S.DORMANT and "ProbeFailed" in (ss["blocks.0"].telemetry.last_error or "")
    assert m.registry.get_sample_value("esper_kernel_load_failures_total", {"reason": "LoadFailed"}) == 1
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    assert math.isfinite(train_steps(model, opt, 2))


def test_a_seed_that_raises_is_culled_and_the_slot_reused() -> None:
    _, model, ss = pair()
    slot = ss["blocks.0"]

    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("kernel crashed")

    slot.germinate(Boom())  # unseen slot: no probe yet
    slot.start_training()
    x = torch.randn(3, F)
    model(x).sum().backward()
    assert slot.state is S.CULLED and slot.seed is None and "kernel crashed" in str(slot.telemetry.last_error)
    slot.reset()
    assert slot.state is S.DORMANT and slot.germinate(make_seed())


def test_telemetry_and_metrics() -> None:
    m = metrics()
    _, model, ss = pair(metrics=m, sample_every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    slot = ss["blocks.1"]
    grow_and_fossilize(model, slot, opt)
    status = status_json(model)
    by_name = {s["name"]: s for s in status["seeds"]}
    assert by_name["blocks.0"]["state"] == "dormant" and by_name["blocks.1"]["state"] == "fossilized"
    assert by_name["blocks.1"]["kernelKey"] == "mlp16" and by_name["blocks.1"]["gradNorm"] > 0
    assert math.isfinite(by_name["blocks.0"]["activationStd"])
    json.dumps(status)
    get = m.registry.get_sample_value
    assert get("esper_seed_state", {"seed": "blocks.1", "state": "fossilized"}) == 1
    assert get("esper_seed_state", {"seed": "blocks.1", "state": "blending"}) == 0
    assert get("esper_seed_transitions_total", {"seed": "blocks.1", "state": "germinated"}) == 1
    assert get("esper_seed_alpha", {"seed": "blocks.1"}) == 1.0
    assert get("esper_seed_grad_norm", {"seed": "blocks.1"}) > 0


class FirstFour(nn.Module):
    """A seed whose output has the wrong shape for batches over 4 (it drops the rest)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:4] * self.scale


def test_a_seed_of_the_wrong_shape_is_left_out_of_evaluation_and_culled_in_training() -> None:
    m = metrics()
    bare, model, ss = pair(metrics=m)
    slot = ss["blocks.0"]
    model(torch.randn(2, F))
    assert slot.germinate(FirstFour())  # the one-sample probe fits
    slot.start_training()
    slot.start_blending(blend_steps=1)
    slot.step()
    x = torch.randn(8, F)
    model.eval()
    with pytest.warns(
        KernelShapeWarning, match=r"slot blocks\.0: kernel eager:FirstFour: seed returned \(4, 16\)"
    ):
        assert torch.equal(model(x), bare(x))  # left out: the host's output
    with torch.no_grad():
        assert torch.equal(model(x), bare(x))
    assert slot.state is S.BLENDING and slot.telemetry.skipped_calls == 2
    labels = {"seed": "blocks.0", "reason": "ShapeMismatch"}
    assert m.registry.get_sample_value("esper_seed_skipped_calls_total", labels) == 2
    model.train()
    assert torch.equal(model(x), bare(x))
    assert slot.state is S.CULLED
    assert slot.telemetry.last_error == (
        "ShapeMismatch: slot blocks.0: kernel eager:FirstFour: "
        "seed returned (4, 16), the activation is (8, 16)"
    )


def test_a_fossil_of_the_wrong_shape_raises_in_training() -> None:
    _, model, ss = pair()
    slot = ss["blocks.1"]
    model(torch.randn(2, F))
    assert slot.germinate(FirstFour())
    slot.start_training()
    slot.start_blending(blend_steps=1)
    slot.fossilize()
    with pytest.raises(
        KernelShapeError, match=r"slot blocks\.1: .*seed returned \(4, 16\), the activation is \(8, 16\)"
    ):
        model(torch.randn(8, F))
    assert slot.state is S.FOSSILIZED
    assert model(torch.randn(3, F)).shape == (3, 1)


def test_an_unseen_slot_checks_its_kernel_at_the_first_forward() -> None:
    bare, model, ss = pair()
    a, b = ss["blocks.0"], ss["blocks.1"]
    assert a.germinate(nn.Linear(8, 8)) and b.germinate(make_seed())  # nothing known yet: accepted
    assert not a._passthrough and not b._passthrough
    model.eval()
    x = torch.randn(3, F)
    with torch.no_grad():
        assert torch.equal(model(x), bare(x))
    assert a.state is S.CULLED and (a.telemetry.last_error or "").startswith("ProbeFailed: slot blocks.0: ")
    assert b.state is S.GERMINATED and b._passthrough  # checked once; the fast path again


def test_wrap_declares_shapes() -> None:
    model = Host()
    with pytest.raises(ValueError, match=r"\['head'\]"):
        wrap(model, at=["blocks.0"], shapes={"head": (1,)})
    with pytest.raises(ValueError, match="positive ints"):
        wrap(model, at=["blocks.0"], shapes={"blocks.0": (0,)})
    assert not any(isinstance(mod, SeedSlot) for mod in model.modules())  # refused before wrapping
    ss = wrap(model, at=["blocks.0", "blocks.1"], shapes={"blocks.0": [F]}, metrics=metrics())
    assert ss["blocks.0"].declared_shape == (F,) and ss["blocks.1"].declared_shape is None


def test_a_blend_of_no_steps_is_refused_and_changes_nothing() -> None:
    with pytest.raises(ValueError, match=r"^blend_steps must be >= 1$"):
        SeedSlot("s", nn.Linear(F, F), blend_steps=0, metrics=metrics())
    slot = SeedSlot("s", nn.Linear(F, F), blend_steps=7, metrics=metrics())
    slot.germinate(make_seed())
    slot.start_training()
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"^blend_steps must be >= 1$"):
            slot.start_blending(blend_steps=bad)
        assert (slot.state, slot.blend_steps) == (S.TRAINING, 7)
    slot.start_blending(blend_steps=1)
    slot.step()
    assert (slot.state, slot.blend_steps, slot.alpha) == (S.BLENDING, 1, 1.0)
