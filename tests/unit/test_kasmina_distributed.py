"""The coordinator's pieces in one process: policy state, digests, seed parameter names, a world of one.

The 2-rank behaviour (agreement, late kernels, refusals, failures, checkpoints) is tested for real
under torchrun in tests/integration/test_distributed.py.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry
from torch import nn

from esper.kasmina import EagerKernel, KasminaMetrics, KernelCatalog, PlateauPolicy, wrap
from esper.kasmina.distributed import (
    RanksDiverged,
    SeedCoordinator,
    ignore_seed_parameters,
    seed_parameter_names,
    state_digest,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Identity(), nn.Linear(8, 2))
    wrap(m, ["1"], blend_steps=2, metrics=KasminaMetrics(CollectorRegistry()))
    return m


def _seed() -> nn.Module:
    torch.manual_seed(5)
    return EagerKernel(nn.Linear(8, 8), "lin-8")


def _policy(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> PlateauPolicy:
    catalog = KernelCatalog()
    catalog.add("lin-8", _seed, 1.0)
    return PlateauPolicy(patience=1, min_delta=10.0, train_steps=2, blend_steps=2, cull_threshold=-1e9,
                         catalog=catalog, evaluate=lambda: 1.0, model=model, optimizer=opt)  # fmt: skip


def test_policy_state_round_trips_and_a_bad_state_changes_nothing() -> None:
    model = _model()
    model(torch.zeros(1, 4))  # the slot learns its activation shape
    p = _policy(model)
    p.on_eval(1.0, 10)
    p.on_eval(1.0, 20)  # a plateau: the seed germinates
    state = p.state_dict()
    assert state["tried"] == [["1", "lin-8"]] and [e["event"] for e in state["events"]] == [
        "plateau",
        "germinate",
    ]

    q = _policy(_model())
    q.load_state_dict(copy.deepcopy(state))
    assert q.state_dict() == state
    before = q.state_dict()
    with pytest.raises(ValueError, match="not a PlateauPolicy state: KeyError: 'badEvals'"):
        q.load_state_dict({k: v for k, v in state.items() if k != "badEvals"})
    with pytest.raises(ValueError, match="not a PlateauPolicy state"):
        q.load_state_dict({**state, "tried": [["only-one-item"]]})
    assert q.state_dict() == before


def test_state_digest_is_the_sha256_of_names_shapes_and_bytes() -> None:
    a, b = _model(), _model()
    assert state_digest(a) == state_digest(b)
    h = hashlib.sha256()  # computed here independently, over the same sorted entries
    # parameters and buffers by their module names (a slot's state_dict keys hide its `host.` level)
    for name, t in sorted([*a.named_parameters(), *a.named_buffers()], key=lambda kv: kv[0]):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode() + t.detach().numpy().tobytes())
    assert state_digest(a) == h.hexdigest()
    with torch.no_grad():
        b[2].bias[1] += 1e-7  # one element, one ulp-sized change
    assert state_digest(a) != state_digest(b)


def test_seed_parameters_are_named_for_ddp_to_ignore() -> None:
    model = _model()
    assert seed_parameter_names(model) == []
    model[1].germinate(_seed())
    assert seed_parameter_names(model) == ["1.seed.module.weight", "1.seed.module.bias"]
    ignore_seed_parameters(model)
    assert set(model._ddp_params_and_buffers_to_ignore) == {"1.seed.module.weight", "1.seed.module.bias"}


def test_the_coordinator_needs_a_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match=r"needs torch\.distributed initialised"):
        SeedCoordinator(_policy(_model()))


@pytest.fixture
def world_of_one() -> Iterator[None]:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_world_of_one_grows_exactly_as_one_process(world_of_one: None) -> None:
    """With one rank the agreement is the identity: same events, same parameters as no coordinator."""

    def run(coordinated: bool) -> tuple[list[dict[str, object]], str, int]:
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        policy = _policy(model, opt)
        coord = SeedCoordinator(policy) if coordinated else None
        gen = torch.Generator().manual_seed(3)
        for step in range(1, 13):
            x = torch.randn(8, 4, generator=gen)
            model(x).pow(2).mean().backward()
            if coord is not None:
                coord.sync_grads()
            opt.step()
            policy.step()
            opt.zero_grad()
            if step % 2 == 0:
                (coord.on_eval if coord is not None else policy.on_eval)(1.0, step)
        if coord is not None:
            assert coord.assert_in_sync(model) == state_digest(model)
        return policy.events, state_digest(model), coord.collectives if coord else 0

    events, digest, collectives = run(True)
    assert (events, digest) == run(False)[:2]
    # Evaluations every 2 steps, patience 1: the first sets the best, the second (step 4) is a plateau;
    # train 2 + blend 2 steps; the fossil fills the only slot, so the next plateau finds nothing.
    assert [(e["step"], e["event"]) for e in events] == [
        (4, "plateau"), (4, "germinate"), (6, "blending"), (8, "fossilize"), (8, "plateau"), (8, "no_kernel"),
    ]  # fmt: skip
    assert collectives > 0


def test_closing_detaches_from_the_policy_and_refuses_later_collectives(world_of_one: None) -> None:
    """After close() the policy is its own again and nothing holds the coordinator (or its groups)."""
    import gc
    import weakref

    policy = _policy(_model())
    local_evaluate, local_contribution = policy.evaluate, lambda: 2.0
    policy.contribution = local_contribution
    coord = SeedCoordinator(policy)
    assert policy.agreement is coord and policy.contribution() == 2.0  # the mean over a world of one
    assert policy.contribution is not local_contribution
    coord.close()
    coord.close()  # idempotent: a second close issues no collective
    assert policy.agreement is None and policy.evaluate == local_evaluate
    assert policy.contribution is local_contribution
    with pytest.raises(RuntimeError, match="this SeedCoordinator is closed"):
        coord.mean(1.0)  # never a collective on the whole world by accident
    with pytest.raises(RuntimeError, match="this SeedCoordinator is closed"):
        coord.on_eval(1.0, 2)
    gc.disable()  # freed by reference counting alone: no cycle keeps the groups to interpreter exit
    try:
        ref = weakref.ref(coord)
        del coord
        assert ref() is None
    finally:
        gc.enable()


def test_rank_states_that_differ_are_refused(world_of_one: None, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = _policy(_model())
    real = dist.all_gather_object

    def lying_gather(out: list[object], obj: object, group: object = None) -> None:
        real(out, obj, group=group)
        out.append([("1", "fossilized", "lin-8")])  # a second rank that restored something else

    monkeypatch.setattr(dist, "all_gather_object", lying_gather)
    with pytest.raises(RanksDiverged, match=r"slot states differ from rank 0's on rank\(s\) \[1\]"):
        SeedCoordinator(policy)


def test_a_seed_that_fails_while_its_blend_is_measured_is_culled_not_fossilized() -> None:
    """One process: the seed raises in the policy's own evaluation at the end of the blend."""

    class FailsInEvaluation(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled() and h.shape[0] > 1:  # not the 1-sample load probe
                raise RuntimeError("seed broke")
            return h + self.lin(h)

    model = _model()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    model(x)

    def evaluate() -> float:
        with torch.no_grad():
            return float(model(x).pow(2).mean())

    catalog = KernelCatalog()
    catalog.add("fails", lambda: EagerKernel(FailsInEvaluation(), "fails"), 1.0)
    policy = PlateauPolicy(patience=1, min_delta=10.0, train_steps=1, blend_steps=1, cull_threshold=-1e9,
                           catalog=catalog, evaluate=evaluate, model=model)  # fmt: skip
    policy.on_eval(1.0, 0)
    policy.on_eval(1.0, 0)  # plateau: germinate
    for _ in range(2):  # train 1 step, blend 1 step: the blend ends and the seed is measured
        model(x).pow(2).mean().backward()
        policy.step()
    assert [e["event"] for e in policy.events] == ["plateau", "germinate", "blending", "cull"]
    assert policy.events[-1]["kernel"] == "fails"  # a cull, though any contribution beats -1e9
    assert model[1].state.value == "dormant" and model[1].seed is None
