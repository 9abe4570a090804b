"""Seed slots: identity when dormant, isolation when training, exact convex blending, checkpoints."""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import pathlib
import warnings

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from esper.kasmina import (
    EagerKernel,
    IllegalTransition,
    KasminaMetrics,
    KernelModule,
    KernelRestoreError,
    KernelShapeError,
    KernelShapeWarning,
    SeedSlot,
    SeedState,
    Transition,
    set_kernel_resolver,
    slots,
    status_json,
    step_slots,
    wrap,
)
from esper.kasmina.telemetry import default_metrics

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
    first = make_seed()
    slot.germinate(first)
    with pytest.raises(IllegalTransition, match=r"^s: illegal seed transition germinated -> germinated; "):
        slot.germinate(make_seed(2))
    assert slot.seed.module is first and slot.state is S.GERMINATED  # the refused kernel replaced nothing


def test_a_second_deferred_germination_before_the_step_is_refused() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    first, second = make_seed(1), make_seed(2)
    assert slot.germinate(first, defer=True)
    with pytest.raises(IllegalTransition, match=r"^s: illegal seed transition dormant -> germinated; "):
        slot.germinate(second, defer=True)
    slot.step()
    assert slot.seed.module is first and slot.state is S.GERMINATED


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


def test_a_live_seed_that_fails_under_an_alpha_override_is_culled_and_y_returned() -> None:
    _, _, ss = pair(blend_steps=4)
    slot = ss["blocks.0"]
    x = torch.randn(3, F)
    slot(x)  # the slot learns its activation shape
    assert slot.germinate(RaisesOnBatches("seed broke"))
    slot.start_training()
    slot.start_blending()
    with slot.alpha_override(0.5):
        assert torch.equal(slot(x), slot.host(x))
    assert slot.state is S.CULLED and "seed broke" in str(slot.telemetry.last_error)


def test_a_fossil_that_fails_under_an_alpha_override_raises() -> None:
    """A fossil is part of the model: its failure is the model's, never quietly dropped."""
    _, _, ss = pair(blend_steps=1)
    slot = ss["blocks.0"]
    x = torch.randn(3, F)
    slot(x)
    assert slot.germinate(RaisesOnBatches("seed broke"))
    slot.start_training()
    slot.start_blending()
    slot.step()
    slot.fossilize()
    with slot.alpha_override(0.5), pytest.raises(RuntimeError, match="seed broke"):
        slot(x)
    assert slot.state is S.FOSSILIZED


def test_keyword_arguments_reach_the_host() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(F, F)

        def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
            return self.lin(x) * scale

    torch.manual_seed(0)
    model = nn.Sequential(Scaled())
    bare = copy.deepcopy(model[0])
    wrap(model, at=["0"], metrics=metrics())
    x = torch.randn(2, F)
    assert torch.equal(model[0](x, scale=3.0), bare(x, scale=3.0))


def test_a_host_whose_nested_names_start_with_a_slot_name_is_refused() -> None:
    model = nn.Sequential(nn.Module())
    model[0].seed = nn.Sequential(nn.Linear(F, F))  # state_dict key "seed.0.weight"
    refused = r"cannot wrap 0: top-level state_dict names \['seed'\] are the slot's own"
    with pytest.raises(ValueError, match=refused):
        wrap(model, at=["0"], metrics=metrics())


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
    key = slot.kernel_key
    assert slot.lifecycle.history[-1].reason == f"kernel {key}"  # germinate()'s reason, kept for the swap
    slot.step()  # nothing left pending: a second step swaps nothing
    slot.cull("tried")
    slot.reset()
    assert slot.germinate(make_seed(2)) and slot.state is S.GERMINATED


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


def test_status_reports_the_counters_and_the_seed_size() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), blend_steps=4, metrics=metrics())
    for _ in range(3):
        slot.step()
    slot.germinate(make_seed(), key="k")
    slot.start_training()
    slot.start_blending()
    slot.step()
    slot.step()
    (status,) = status_json(nn.Sequential(slot))["seeds"]
    seed_params = (F * 32 + 32) + (32 * F + F)  # make_seed's two Linear layers
    fields = ("name", "state", "kernelKey", "alpha", "stepsInState", "globalStep", "seedParams")
    assert tuple(status[f] for f in fields) == ("s", "blending", "k", 0.5, 2, 5, seed_params)
    idle = SeedSlot("idle", nn.Linear(F, F), metrics=metrics()).status()
    assert tuple(idle[f] for f in fields) == ("idle", "dormant", None, 0.0, 0, 0, 0)


def test_slot_state_is_the_lifecycle_and_counters_as_plain_json() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), blend_steps=4, per_token=True, metrics=metrics())
    slot.step()
    slot.germinate(make_seed(), key="k", step=7)
    slot.start_training()
    slot.step()
    assert slot.slot_state() == {
        "version": 1,
        "name": "s",
        "state": "training",
        "alpha": 0.0,
        "blendStep": 0,
        "blendSteps": 4,
        "globalStep": 2,
        "stepsInState": 1,
        "kernelKey": "k",
        "history": [
            {"step": 7, "from_state": "dormant", "to_state": "germinated", "reason": "kernel k"},
            {"step": 1, "from_state": "germinated", "to_state": "training", "reason": "train in isolation"},
        ],
        "perToken": True,
        "causal": False,
    }


def test_an_older_dict_slot_state_loads_and_keeps_what_it_does_not_say() -> None:
    old = {"version": 1, "state": "dormant", "alpha": 0.0, "blendStep": 0, "blendSteps": 9}
    old |= {"globalStep": 12, "stepsInState": 5}  # no history, perToken or causal
    slot = SeedSlot("s", nn.Linear(F, F), per_token=True, causal=True, metrics=metrics())
    slot.set_extra_state(old)
    assert (slot.state, slot.blend_steps, slot.global_step, slot.steps_in_state) == (S.DORMANT, 9, 12, 5)
    assert slot.lifecycle.history == [] and slot.per_token is True and slot.causal is True
    plain = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    plain.set_extra_state(old | {"perToken": True, "causal": True})  # what the checkpoint says wins
    assert plain.per_token is True and plain.causal is True


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.uint8)


def _decode_error(data: bytes) -> str:
    try:
        json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return str(e)
    raise AssertionError("readable")


NEWER = {"version": 2, "state": "dormant", "pad": "x" * 300}
NOT_UTF8, NOT_JSON = b"\xff\xfe", b'{"version": 1'
UINT8_2D = torch.zeros(2, 2, dtype=torch.uint8)
BAD_SLOT_STATES = {  # what set_extra_state is given -> the refusal, in its documented wording
    "not-utf8": (_as_tensor(NOT_UTF8), "slot s: unreadable slot state: " + _decode_error(NOT_UTF8)),
    "not-json": (_as_tensor(NOT_JSON), "slot s: unreadable slot state: " + _decode_error(NOT_JSON)),
    "newer-dict": (NEWER, "slot s: unknown slot state " + repr(NEWER)[:200]),
    "newer-bytes": (
        _as_tensor(json.dumps(NEWER).encode()),
        "slot s: unknown slot state " + repr(NEWER)[:200],
    ),
    "float-tensor": (torch.zeros(3), "slot s: unknown slot state " + repr(torch.zeros(3))[:200]),
    "2d-bytes": (UINT8_2D, "slot s: unknown slot state " + repr(UINT8_2D)[:200]),
    "list": (["version", 1], "slot s: unknown slot state ['version', 1]"),
}


@pytest.mark.parametrize("case", list(BAD_SLOT_STATES))
def test_an_unreadable_or_unknown_slot_state_is_refused_and_changes_nothing(case: str) -> None:
    given, expected = BAD_SLOT_STATES[case]
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    slot.step()
    with pytest.raises(KernelRestoreError) as raised:
        slot.set_extra_state(given)
    assert str(raised.value) == expected
    assert (slot.state, slot.global_step, slot.lifecycle.history) == (S.DORMANT, 1, [])


def _state_with_kernel(key: str) -> dict[str, object]:
    src = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    src.germinate(make_seed(), key=key)
    return src.slot_state()


def test_a_restored_slot_rebuilds_its_kernel_only_when_the_key_differs() -> None:
    m = metrics()
    asked: list[str] = []

    def resolve(key: str) -> nn.Module:
        asked.append(key)
        return make_seed(5)  # a plain module: it becomes the kernel of the key asked for

    slot = SeedSlot("s", nn.Linear(F, F), metrics=m, kernel_resolver=resolve)
    slot.set_extra_state(_state_with_kernel("a"))
    assert (asked, slot.kernel_key, slot.state) == (["a"], "a", S.GERMINATED)
    get = m.registry.get_sample_value
    assert get("esper_seed_state", {"seed": "s", "state": "germinated"}) == 1
    assert get("esper_seed_state", {"seed": "s", "state": "dormant"}) == 0
    seed = slot.seed
    slot.set_extra_state(_state_with_kernel("a"))  # the kernel it holds: kept, not rebuilt
    assert asked == ["a"] and slot.seed is seed
    slot.set_extra_state(_state_with_kernel("b"))
    assert (asked, slot.kernel_key) == (["a", "b"], "b")


NO_RESOLVER = (
    "slot s: the checkpoint holds seed kernel a; set a kernel_resolver "
    "(set_kernel_resolver(model, fn)) before load_state_dict"
)


def _failing(e: Exception) -> object:
    def resolve(key: str) -> nn.Module:
        raise e

    return resolve


@pytest.mark.parametrize(
    ("resolver", "message"),
    [
        (None, NO_RESOLVER),
        (_failing(OSError("bundle gone")), "slot s: cannot rebuild kernel a: bundle gone"),
        (lambda key: EagerKernel(make_seed(), "b"), "slot s: resolver returned kernel b, not a"),
    ],
    ids=["no-resolver", "resolver-fails", "wrong-kernel"],
)
def test_a_kernel_that_cannot_be_rebuilt_is_refused_by_name(resolver: object, message: str) -> None:
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics(), kernel_resolver=resolver)  # type: ignore[arg-type]
    with pytest.raises(KernelRestoreError) as raised:
        slot.set_extra_state(_state_with_kernel("a"))
    assert str(raised.value) == message
    assert (slot.state, slot.seed) == (S.DORMANT, None)


def test_a_restored_compiled_kernel_is_adopted_by_its_slot() -> None:
    kernel = KernelModule(None, None, [], key="c" * 64)  # never called here: no runners needed
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics(), kernel_resolver=lambda key: kernel)
    slot.set_extra_state(_state_with_kernel("c" * 64))
    assert slot.seed is kernel and kernel.slot_name == "s"  # its shape errors will name the slot


class LongName(nn.Module):
    """Fits a one-sample probe; for larger batches returns an object whose type name is 600 long."""

    def forward(self, x: torch.Tensor) -> object:
        return x if x.shape[0] == 1 else type("L" * 600, (), {})()


def test_a_misfit_is_reported_in_full_once_then_counted_and_truncated_in_telemetry() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    slot(torch.randn(1, F))  # seen: germination probes the kernel
    assert slot.germinate(LongName(), key="k")
    slot.start_training()
    slot.start_blending()
    full = f"ShapeMismatch: slot s: kernel k: seed returned {'L' * 600}, the activation is (8, {F})"
    x = torch.randn(8, F)
    slot.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert torch.equal(slot(x), slot.host(x))
    assert [str(w.message) for w in caught if w.category is KernelShapeWarning] == [
        f"{full}. The seed is left out of this blending call (eval mode or no_grad) and the slot returns "
        "the host's output; further such calls are only counted (telemetry skipped_calls)"
    ]
    assert (slot.telemetry.skipped_calls, slot.telemetry.last_skip) == (3, full[:500])
    slot.train()
    assert torch.equal(slot(x), slot.host(x))
    assert (slot.state, slot.telemetry.last_error) == (S.CULLED, full[:500])


def test_an_unseen_slot_leaves_a_misfit_out_of_evaluation_and_culls_it_in_training() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), blend_steps=1, metrics=metrics())
    assert slot.germinate(nn.Linear(F, 8), key="narrow")  # nothing known yet: accepted
    slot.start_training()
    slot.start_blending()
    slot.step()  # alpha 1: the seed's output would replace y
    x = torch.randn(4, F)
    misfit = f"ShapeMismatch: slot s: kernel narrow: kernel maps (1, ({F},)) to (1, 8)"
    slot.eval()
    with pytest.warns(KernelShapeWarning):
        assert torch.equal(slot(x), slot.host(x))
    assert (slot.state, slot.telemetry.skipped_calls, slot.telemetry.last_skip) == (S.BLENDING, 1, misfit)
    slot.train()
    assert torch.equal(slot(x), slot.host(x))
    assert (slot.state, slot.telemetry.last_error, slot.telemetry.skipped_calls) == (S.CULLED, misfit, 1)


def test_an_unseen_slot_checks_a_compiled_kernel_against_the_activation_device() -> None:
    kernel = KernelModule(None, None, [], key="c" * 64, input_shapes=[["batch", F]],
                          output_shapes=[["batch", F]], device="meta")  # fmt: skip
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    assert slot.germinate(kernel)
    slot.eval()
    with pytest.warns(KernelShapeWarning), torch.no_grad():
        slot(torch.randn(2, F))
    expected = f"ShapeMismatch: slot s: kernel {'c' * 16}: kernel runs on meta, the activation is on cpu"
    assert slot.telemetry.last_skip == expected


def test_a_germinated_compiled_kernel_is_adopted_by_its_slot() -> None:
    kernel = KernelModule(None, None, [], key="d" * 64)  # unseen slot: no probe, never called
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    assert slot.germinate(kernel)
    assert kernel.slot_name == "s"  # its shape errors will name the slot


def _skip_warnings(slot: SeedSlot, x: torch.Tensor) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slot(x)
        slot(x)
    return [str(w.message) for w in caught if w.category is KernelShapeWarning]


def test_each_new_kernel_gets_its_own_skip_warning() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    slot(torch.randn(1, F))
    x = torch.randn(8, F)
    for key in ("first", "second"):
        assert slot.germinate(LongName(), key=key)
        slot.start_training()
        slot.start_blending()
        slot.eval()
        warned = _skip_warnings(slot, x)
        assert len(warned) == 1 and f"kernel {key}:" in warned[0]  # once per kernel, not once per slot
        slot.train()
        slot.cull("misfit")
        slot.reset()


def test_a_training_seed_that_misfits_in_eval_mode_with_grad_is_left_out_and_named_training() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    slot(torch.randn(1, F))
    assert slot.germinate(LongName(), key="k")
    slot.start_training()
    slot.eval()  # evaluation with autograd on (a validation loss kept for a later backward, say)
    x = torch.randn(8, F)
    warned = _skip_warnings(slot, x)
    assert len(warned) == 1 and "left out of this training call" in warned[0]
    assert slot.state is S.TRAINING and torch.equal(slot(x), slot.host(x))


def test_a_restored_fossil_replaces_y_whatever_alpha_its_state_records() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), blend_steps=1, metrics=metrics())
    slot(torch.randn(1, F))
    assert slot.germinate(make_seed(), key="k")
    slot.start_training()
    slot.start_blending()
    slot.step()
    slot.fossilize()
    state = slot.slot_state()
    slot.set_extra_state({**state, "alpha": 0.5})  # a hand-edited checkpoint: the fossil is still whole
    x = torch.randn(3, F)
    assert slot.state is S.FOSSILIZED and torch.equal(slot(x), slot.seed(slot.host(x)))


def test_a_seen_slot_refuses_a_compiled_kernel_for_another_device_before_calling_it() -> None:
    kernel = KernelModule(None, None, [], key="e" * 64, input_shapes=[["batch", F]],
                          output_shapes=[["batch", F]], device="meta")  # fmt: skip
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    slot(torch.randn(2, F))  # seen on the CPU
    assert not slot.germinate(kernel)
    assert slot.telemetry.last_error == (
        f"ShapeMismatch: slot s: kernel {'e' * 16}: kernel runs on meta, the activation is on cpu"
    )  # from its manifest: the kernel was never called (it has no runners to call)
    assert (slot.state, slot.seed) == (S.DORMANT, None)


def test_a_germination_after_a_refusal_clears_the_error_and_reports_the_load_time() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())  # unseen: nothing to probe against
    assert not slot.germinate(lambda: "not a module", key="bad")  # type: ignore[arg-type,return-value]
    assert slot.telemetry.last_error == "NotAModule: loader returned str"
    kernel = KernelModule(None, None, [], key="f" * 64, load_seconds=0.25)
    assert slot.germinate(kernel)
    assert slot.telemetry.last_error is None and slot.telemetry.load_seconds == 0.25


@pytest.mark.parametrize(
    ("per_token", "x_shape", "asked"),
    [(False, (2, 5, F), (5, F)), (True, (2, 3, 5, F), (F,)), (True, (2, 5, F), (F,))],
)
def test_a_bundle_is_checked_against_the_sample_shape_the_slot_feeds_it(
    monkeypatch: pytest.MonkeyPatch, per_token: bool, x_shape: tuple[int, ...], asked: tuple[int, ...]
) -> None:
    """A per-token slot feeds its kernel one position at a time: the bundle must take (F,)."""
    import esper.kasmina.seed as seed_module

    seen: list[object] = []

    def fake_load(*_: object, sample_shape: object, **__: object) -> nn.Module:
        seen.append(sample_shape)
        return EagerKernel(make_seed(), "bundle")

    monkeypatch.setattr(seed_module, "load_kernel", fake_load)
    slot = SeedSlot("s", nn.Identity(), per_token=per_token, metrics=metrics())
    slot(torch.randn(*x_shape))
    slot.germinate("/nonexistent/bundle")
    assert seen == [asked]


class Crash(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("x" * 600)


def test_an_unseen_slot_culls_a_crashing_training_seed_with_a_truncated_reason() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    assert slot.germinate(Crash(), key="crash")
    slot.start_training()
    x = torch.randn(2, F)
    assert torch.equal(slot(x), slot.host(x))
    expected = ("ProbeFailed: slot s: RuntimeError: " + "x" * 600)[:500]
    assert (slot.state, slot.seed, slot.telemetry.last_error) == (S.CULLED, None, expected)


def test_cull_and_reset_record_their_step_and_clear_the_seed() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), blend_steps=4, metrics=metrics())
    slot.germinate(make_seed(), key="k")
    slot.start_training()
    slot.start_blending()
    slot.step()
    slot.step()
    assert slot.alpha == 0.5
    slot.cull("worse than the host", step=40)
    assert (slot.state, slot.alpha, slot.seed, slot.telemetry.last_error) == (
        S.CULLED, 0.0, None, "worse than the host")  # fmt: skip
    assert slot.lifecycle.history[-1] == Transition(40, S.BLENDING, S.CULLED, "worse than the host")
    slot.reset(step=41)
    assert slot.lifecycle.history[-1] == Transition(41, S.CULLED, S.DORMANT, "slot reused")
    assert slot.telemetry.kernel_key is None and slot.status()["kernelKey"] is None


def test_a_seed_culled_before_its_first_forward_leaves_nothing_to_check() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    assert slot.germinate(make_seed())  # unseen: to be checked at the first forward
    slot.cull("dropped")
    x = torch.randn(2, F)
    assert torch.equal(slot(x), slot.host(x))
    assert slot._passthrough  # the idle fast path: no pending check of a kernel that is gone


def test_step_slots_walks_the_model_only_after_a_slot_was_created(monkeypatch: pytest.MonkeyPatch) -> None:
    _, model, ss = pair()
    walks: list[int] = []
    walk = model.modules

    def counted() -> object:
        walks.append(1)
        return walk()

    monkeypatch.setattr(model, "modules", counted)
    for _ in range(3):
        step_slots(model)
    assert len(walks) == 1 and [s.global_step for s in ss.values()] == [3, 3]
    SeedSlot("elsewhere", metrics=metrics())  # any new slot may be in the model: walk again, once
    step_slots(model)
    step_slots(model)
    assert len(walks) == 2 and [s.global_step for s in ss.values()] == [5, 5]


def test_checkpoint_bytes_are_json_with_sorted_keys() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    data = bytes(slot.get_extra_state().tolist())
    assert list(json.loads(data)) == sorted(slot.slot_state())  # the same state, the same bytes


def test_a_bundle_is_loaded_for_the_device_shape_and_dtype_the_slot_knows(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    calls: list[tuple[object, ...]] = []

    def load(bundle: object, sha: object, device: torch.device, **kw: object) -> nn.Module:
        calls.append((bundle, sha, device, kw["sample_shape"], kw["sample_dtype"], kw["metrics"]))
        return EagerKernel(nn.Identity(), "bundled")

    monkeypatch.setattr("esper.kasmina.seed.load_kernel", load)
    free = SeedSlot("free", metrics=metrics())  # no host, nothing seen: the CPU
    assert free.germinate(tmp_path, expected_sha256="ab" * 32)
    assert calls[-1] == (tmp_path, "ab" * 32, torch.device("cpu"), None, None, free.metrics)
    on_meta = SeedSlot("meta", nn.Linear(F, F, device="meta"), shape=(F,), metrics=metrics())
    assert on_meta.germinate(str(tmp_path))  # nothing seen: the host's device and the declared shape
    assert calls[-1] == (str(tmp_path), None, torch.device("meta"), (F,), None, on_meta.metrics)
    seen = SeedSlot("seen", per_token=True, metrics=metrics())  # no host: its input is its activation
    seen(torch.zeros(2, 3, F, device="meta"))
    assert seen.germinate(tmp_path)  # what the first forward recorded; one position per token
    assert calls[-1] == (tmp_path, None, torch.device("meta"), (F,), "float32", seen.metrics)


def test_a_sampled_step_records_alpha_and_the_seed_gradient_norm() -> None:
    m = metrics()
    slot = SeedSlot("s", nn.Linear(F, F), blend_steps=4, sample_every=2, metrics=m)
    slot.germinate(make_seed(), key="k")
    slot.start_training()
    slot.start_blending()
    slot.step()  # global step 1: not sampled
    slot(torch.randn(3, F)).pow(2).sum().backward()
    assert slot.telemetry.alpha == 0.0 and slot.telemetry.grad_norm is None
    slot.step()  # global step 2: sampled
    grads = torch.cat([p.grad.flatten() for p in slot.seed_parameters()])  # type: ignore[union-attr]
    expected = float(grads.pow(2).sum().sqrt())
    assert slot.telemetry.alpha == 0.5
    assert float(slot.telemetry.grad_norm) == pytest.approx(expected, rel=1e-6)  # type: ignore[arg-type]
    get = m.registry.get_sample_value
    assert get("esper_seed_alpha", {"seed": "s"}) == 0.5
    assert get("esper_seed_grad_norm", {"seed": "s"}) == pytest.approx(expected, rel=1e-6)


def test_the_slot_defaults() -> None:
    slot = SeedSlot("defaults")
    assert (slot.blend_steps, slot.sample_every, slot.idle_sample_every) == (100, 10, 200)
    assert (slot.per_token, slot.causal, slot.declared_shape, slot.kernel_resolver) == (
        False,
        False,
        None,
        None,
    )
    assert slot.metrics is default_metrics() and slot.host is None and slot.seed is None
    counters = (slot.alpha, slot.blend_step, slot.global_step, slot.steps_in_state, slot.state)
    assert counters == (0.0, 0, 0, 0, S.DORMANT)


def test_a_zero_sampling_interval_never_samples() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), sample_every=0, idle_sample_every=0, metrics=metrics())
    x = torch.randn(2, F)
    slot(x)  # the first forward records the activation whatever the interval
    for _ in range(5):
        slot.step()
        slot(x)
    assert slot.telemetry.samples == 1 and slot._passthrough
    slot.germinate(make_seed())
    slot.start_training()
    for _ in range(3):
        slot(x).sum().backward()
        slot.step()
    assert slot.telemetry.samples == 1 and slot.telemetry.grad_norm is None


def test_transitions_and_refusals_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="esper.kasmina")
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    slot(torch.randn(2, F))
    assert not slot.germinate(nn.Linear(8, 8))
    refusal = slot.telemetry.last_error
    assert refusal is not None and refusal.startswith("ProbeFailed: ")
    assert slot.germinate(make_seed(), key="k", step=3)
    slot.start_training(step=4)
    assert [r.getMessage() for r in caplog.records if r.name == "esper.kasmina"] == [
        f"seed s: kernel refused, slot stays dormant: {refusal}",
        "seed s: dormant -> germinated at step 3 (kernel k)",
        "seed s: germinated -> training at step 4 (train in isolation)",
    ]


def test_blending_records_its_length_in_the_history() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), blend_steps=5, metrics=metrics())
    slot.germinate(make_seed())
    slot.start_training()
    slot.start_blending()
    assert slot.lifecycle.history[-1].reason == "blend over 5 steps"
    again = SeedSlot("t", nn.Linear(F, F), blend_steps=5, metrics=metrics())
    again.germinate(make_seed())
    again.start_training()
    again.start_blending(step=12, blend_steps=7)
    assert again.lifecycle.history[-1] == Transition(12, S.TRAINING, S.BLENDING, "blend over 7 steps")
    assert again.blend_steps == 7


def test_a_seed_takes_the_slots_mode_and_the_probe_gives_it_back() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    slot.eval()
    seed = nn.Sequential(nn.Linear(F, F), nn.Dropout(0.5))
    assert slot.germinate(seed) and not seed.training  # installed in the slot's (eval) mode
    training = SeedSlot("t", nn.Linear(F, F), metrics=metrics())
    seed = nn.Sequential(nn.Linear(F, F), nn.Dropout(0.5))
    assert training.germinate(seed) and seed.training
    training.start_training()
    training(torch.randn(2, F))  # unseen: the first forward probes the seed in eval mode
    assert seed.training  # and puts it back in training mode


def test_a_missing_attribute_names_the_slot_and_its_host() -> None:
    slot = SeedSlot("blocks.0", nn.Linear(F, F), metrics=metrics())
    assert slot.in_features == F  # the host's
    with pytest.raises(AttributeError) as raised:
        _ = slot.nope
    assert str(raised.value) == (
        "'SeedSlot' object (slot 'blocks.0') and its host 'Linear' have no attribute 'nope'"
    )
    with pytest.raises(AttributeError) as raised:
        _ = SeedSlot("free", metrics=metrics()).nope  # no host: nn.Module's own error
    assert str(raised.value) == "'SeedSlot' object has no attribute 'nope'"


class Clash(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seed = nn.Linear(2, 2)
        self.host = nn.Linear(2, 2)
        self.w = nn.Linear(2, 2)


def test_wrap_refuses_a_slot_twice_and_host_names_that_are_the_slots_own() -> None:
    model = Host()
    ss = wrap(model, at=["head"], metrics=metrics())  # a top-level submodule
    assert model.head is ss["head"] and isinstance(model.head.host, nn.Linear)
    with pytest.raises(ValueError) as raised:
        wrap(model, at=["head"], metrics=metrics())
    assert str(raised.value) == "head is already a seed slot"
    with pytest.raises(ValueError) as raised:
        SeedSlot("c", Clash(), metrics=metrics())
    assert (
        str(raised.value) == "cannot wrap c: top-level state_dict names ['host', 'seed'] are the slot's own"
    )


class Causal(nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.f = nn.Linear(F, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


def _broken_loader() -> nn.Module:
    raise OSError("disk on fire")


HINT = "(compile it with a causal Blueprint, or use a per-token slot for a position-wise kernel)"


@pytest.mark.parametrize(
    ("kernel", "refusal"),
    [
        (lambda: 42, "NotAModule: loader returned int"),
        (_broken_loader, "LoadFailed: OSError: disk on fire"),
        (Causal(False), f"NotCausal: slot s is causal; kernel k lets positions see later ones {HINT}"),
        (make_seed(), f"NotCausal: slot s is causal; kernel k does not say if it is causal {HINT}"),
    ],
    ids=["not-a-module", "loader-fails", "not-causal", "unknown-causality"],
)
def test_a_refused_kernel_says_why(kernel: object, refusal: str) -> None:
    m = metrics()
    slot = SeedSlot("s", nn.Linear(F, F), causal=True, metrics=m)
    assert not slot.germinate(kernel, key="k")  # type: ignore[arg-type]
    assert (slot.state, slot.seed, slot.telemetry.last_error) == (S.DORMANT, None, refusal)
    failures = m.registry.get_sample_value("esper_kernel_load_failures_total", {"reason": "LoadFailed"})
    assert failures == (1 if refusal.startswith("LoadFailed") else None)


def test_a_causal_slot_takes_a_causal_kernel_and_a_per_token_one_takes_any() -> None:
    assert SeedSlot("s", nn.Linear(F, F), causal=True, metrics=metrics()).germinate(Causal(True))
    per_token = SeedSlot("p", nn.Linear(F, F), causal=True, per_token=True, metrics=metrics())
    assert per_token.germinate(Causal(False))


def test_a_fossil_is_kept_at_alpha_one_with_its_reason() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), blend_steps=4, metrics=metrics())
    slot.germinate(make_seed())
    slot.start_training()
    slot.start_blending()
    slot.step()
    slot.fossilize()
    assert (slot.state, slot.alpha, slot.lifecycle.history[-1].reason) == (S.FOSSILIZED, 1.0, "kept")
    other = SeedSlot("t", nn.Linear(F, F), metrics=metrics())
    other.germinate(make_seed())
    other.start_training()
    other.start_blending()
    other.fossilize(step=9, reason="policy: kept at +3%")
    assert other.lifecycle.history[-1] == Transition(9, S.BLENDING, S.FOSSILIZED, "policy: kept at +3%")


@pytest.mark.parametrize("shape", [(0,), (F, -1), (16.0,), ("16",)], ids=["zero", "negative", "float", "str"])
def test_a_declared_shape_must_be_positive_ints(shape: tuple[object, ...]) -> None:
    with pytest.raises(ValueError) as raised:
        SeedSlot("s", nn.Linear(F, F), shape=shape, metrics=metrics())  # type: ignore[arg-type]
    assert str(raised.value) == f"shape must be positive ints (the per-sample shape, no batch), got {shape!r}"


def test_a_new_slot_is_dormant_in_its_metrics_and_names_itself_in_errors() -> None:
    m = metrics()
    slot = SeedSlot("blocks.3", nn.Linear(F, F), shape=(1, F), blend_steps=1, metrics=m)
    assert (slot.declared_shape, slot.blend_steps) == ((1, F), 1)  # ones are positive
    get = m.registry.get_sample_value
    states = {s.value: get("esper_seed_state", {"seed": "blocks.3", "state": s.value}) for s in S}
    assert states == {s.value: (1.0 if s is S.DORMANT else 0.0) for s in S}
    with pytest.raises(IllegalTransition) as raised:
        slot.fossilize()
    assert str(raised.value).startswith("blocks.3: illegal seed transition dormant -> fossilized")


def test_an_idle_slot_does_step_work_only_at_its_sampling_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    slot = SeedSlot("s", nn.Linear(F, F), idle_sample_every=100, metrics=metrics())
    advanced: list[int] = []
    advance = slot._advance

    def counted() -> None:
        advanced.append(slot.global_step)
        advance()

    monkeypatch.setattr(slot, "_advance", counted)
    x = torch.randn(2, F)
    for _ in range(250):
        slot.step()
        slot(x)
    assert advanced == [1, 100, 200]  # the first step finds its wake-up step, then every 100th
    every_step = SeedSlot("t", nn.Linear(F, F), idle_sample_every=1, metrics=metrics())
    for _ in range(3):
        every_step(x)
        every_step.step()
    assert every_step.telemetry.samples == 3


def test_a_new_seed_starts_its_counters_at_zero() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), blend_steps=4, metrics=metrics())
    slot.germinate(make_seed())
    slot.start_training()
    slot.start_blending()
    slot.step()
    slot.step()
    slot.cull("worse")
    slot.reset()
    slot.germinate(make_seed(2))
    state = slot.slot_state()
    assert (state["state"], state["alpha"], state["blendStep"]) == ("germinated", 0.0, 0)


def test_a_per_token_slot_checks_a_kernel_against_one_position() -> None:
    flat = SeedSlot("flat", nn.Linear(F, F), per_token=True, metrics=metrics())
    flat(torch.randn(4, F))  # [batch, F]: a position is the whole sample
    assert flat.germinate(make_seed()), flat.telemetry.last_error
    seq = SeedSlot("seq", nn.Linear(F, F), per_token=True, metrics=metrics())
    seq(torch.randn(2, 5, F))  # [batch, T, F]: the kernel sees [batch*T, F]
    assert seq.germinate(make_seed()), seq.telemetry.last_error
    seq.start_training()
    seq.start_blending(blend_steps=1)
    seq.step()
    x = torch.randn(3, 7, F)  # another sequence length
    y = seq.host(x)
    assert torch.equal(seq(x), seq.seed(y.reshape(-1, F)).reshape(3, 7, F))


class Rows(nn.Module):
    """A position-wise kernel that takes only [rows, F], as one compiled for [batch, F] does."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(F, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"takes [rows, {F}], got {tuple(x.shape)}")
        return self.f(x)


def test_a_per_token_slot_probes_one_position_and_refuses_a_misfit() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), per_token=True, metrics=metrics())
    slot(torch.randn(2, 5, F))
    assert not slot.germinate(nn.Linear(8, 8))  # does not fit one position of 16
    assert (slot.telemetry.last_error or "").startswith("ProbeFailed: ")
    assert slot.germinate(Rows(), key="rows"), slot.telemetry.last_error  # probed with [1, F]


class Tupled(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x,)


def test_a_probe_that_returns_no_tensor_is_refused_by_name() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    slot(torch.randn(2, F))
    assert not slot.germinate(Tupled(), key="k")
    assert slot.telemetry.last_error == f"ShapeMismatch: kernel k: kernel maps (1, ({F},)) to tuple"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_an_eager_seed_is_moved_to_the_activation_s_dtype(dtype: torch.dtype) -> None:
    slot = SeedSlot("s", metrics=metrics())  # no host: its input is the activation
    slot(torch.randn(2, F, dtype=dtype))
    seed = make_seed()
    assert slot.germinate(seed), slot.telemetry.last_error
    assert {p.dtype for p in seed.parameters()} == {dtype}


def test_an_eager_seed_is_moved_to_the_activation_s_device() -> None:
    slot = SeedSlot("s", metrics=metrics())
    slot(torch.zeros(2, F, device="meta"))
    seed = make_seed()
    assert slot.germinate(seed), slot.telemetry.last_error
    assert {p.device for p in seed.parameters()} == {torch.device("meta")}


def _compiled(**kw: object) -> KernelModule:
    """A compiled kernel's shell (no runners: never called) with manifest shapes for [batch, F]."""
    shapes = {"input_shapes": [["batch", F]], "output_shapes": [["batch", F]], "device": "cpu"}
    return KernelModule(None, None, [], key="c" * 64, **{**shapes, **kw})  # type: ignore[arg-type]


def test_a_compiled_kernel_is_checked_against_its_manifest_before_any_probe() -> None:
    declared = SeedSlot("s", nn.Linear(F, F), shape=(F,), metrics=metrics())  # shape known, dtype not
    assert declared.germinate(_compiled())  # fits; the probe waits for the first forward's dtype
    narrow = SeedSlot("s", nn.Linear(F, F), shape=(8,), metrics=metrics())
    assert not narrow.germinate(_compiled())
    expected = f"ShapeMismatch: slot s: kernel {'c' * 16}: kernel input shape (batch >=1, {F}) does not fit "
    assert narrow.telemetry.last_error == expected + "activation (batch, 8)"
    seen = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    seen(torch.randn(2, F))
    assert not seen.germinate(_compiled(input_dtypes=["float64"]))
    assert seen.telemetry.last_error == (
        f"ShapeMismatch: slot s: kernel {'c' * 16}: "
        "kernel input dtype float64 is not the activation's float32"
    )


class RaisesOnBatches(nn.Module):
    """Passes the one-sample probe; raises `message` (default: a long one) on a real batch."""

    def __init__(self, message: str = "x" * 600) -> None:
        super().__init__()
        self.f = nn.Linear(F, F)
        self.message = message

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            raise RuntimeError(self.message)
        return self.f(x)


def test_a_seed_that_raises_in_training_is_culled_with_a_truncated_reason() -> None:
    slot = SeedSlot("s", nn.Linear(F, F), metrics=metrics())
    slot(torch.randn(1, F))
    assert slot.germinate(RaisesOnBatches())
    slot.start_training()
    x = torch.randn(4, F)
    assert torch.equal(slot(x), slot.host(x))
    expected = ("SeedError: RuntimeError: " + "x" * 600)[:500]
    assert (slot.state, slot.telemetry.last_error) == (S.CULLED, expected)


class Opaque(nn.Module):
    """Fits the one-sample probe; returns a plain object for larger inputs."""

    def forward(self, x: torch.Tensor) -> object:
        return x if x.shape[0] == 1 else object()


def test_a_per_token_seed_that_returns_no_tensor_or_the_wrong_rows_is_left_out() -> None:
    for seed, got in [(Opaque(), "object"), (FirstFour(), (4, F))]:
        slot = SeedSlot("s", nn.Linear(F, F), per_token=True, metrics=metrics())
        slot(torch.randn(1, 1, F))
        assert slot.germinate(seed, key="k")
        slot.start_training()
        slot.start_blending(blend_steps=1)
        slot.step()
        slot.eval()
        x = torch.randn(2, 3, F)
        with pytest.warns(KernelShapeWarning):
            assert torch.equal(slot(x), slot.host(x))
        assert slot.telemetry.last_skip == (
            f"ShapeMismatch: slot s: kernel k: seed returned {got}, the activation is (2, 3, {F})"
        )
