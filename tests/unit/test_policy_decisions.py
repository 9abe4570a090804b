"""The plateau policy's bookkeeping, decision by decision: catalog order, refusals, culls, the optimizer's
param groups, data-parallel agreement and its saved state, each against values worked out by hand."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from esper.artifact import read_manifest, write_manifest
from esper.contracts.common import ValidationReport
from esper.kasmina import KernelCatalog, PlateauPolicy, SeedSlot, SeedState
from esper.kasmina.policy import CatalogEntry
from tests.support.s3 import make_fake_bundle

F = 4


def _lin() -> nn.Module:
    return nn.Linear(F, F)


def _broken() -> nn.Module:
    raise RuntimeError("no such kernel")


def _slot() -> SeedSlot:
    slot = SeedSlot("s", nn.Linear(F, F))
    slot(torch.zeros(2, F))  # the slot learns its activation shape, (F,)
    return slot


def _policy(
    catalog: KernelCatalog,
    evaluate: Callable[[], float] = lambda: 1.0,
    optimizer: torch.optim.Optimizer | None = None,
    **options: Any,
) -> PlateauPolicy:
    return PlateauPolicy(
        patience=1, min_delta=0.25, train_steps=1, blend_steps=1, catalog=catalog, evaluate=evaluate,
        seed_slots={"s": _slot()}, optimizer=optimizer, **options,
    )  # fmt: skip


def _plateau(policy: PlateauPolicy, step: int = 10) -> None:
    """Two equal losses with patience 1: a plateau at the second."""
    policy.on_eval(1.0, step=step - 1)
    policy.on_eval(1.0, step=step)


def _values(*xs: float) -> Callable[[], float]:
    it: Iterator[float] = iter(xs)
    return lambda: next(it)


def test_the_catalog_ranks_by_score_then_key_and_keeps_what_fits() -> None:
    cat = KernelCatalog([CatalogEntry("b", _lin, 1.0), CatalogEntry("a", _lin, 1.0, (4,))])
    cat.add("c", _lin, 2.0, (8,))
    cat.add("d", _lin, -0.5, sha256="f" * 64)
    assert [e.key for e in cat.ranked()] == ["c", "a", "b", "d"]
    assert [e.key for e in cat.ranked((4,))] == ["a", "b", "d"]  # c is 8 wide; b and d say nothing
    assert [e.key for e in cat.ranked((8,))] == ["c", "b", "d"]
    assert cat.ranked()[-1] == CatalogEntry("d", _lin, -0.5, None, "f" * 64)
    assert len(cat) == 4
    cat.add("b", _lin, 3.0)  # the same key again replaces the entry
    assert [e.key for e in cat.ranked()] == ["b", "c", "a", "d"] and len(cat) == 4


def test_the_policy_needs_exactly_one_of_a_model_or_slots_and_documents_its_defaults() -> None:
    for where in ({"model": nn.Linear(F, F), "seed_slots": {}}, {}):
        with pytest.raises(ValueError, match=r"^give exactly one of model or seed_slots$"):
            PlateauPolicy(catalog=KernelCatalog(), evaluate=lambda: 1.0, **where)  # type: ignore[arg-type]
    p = PlateauPolicy(catalog=KernelCatalog(), evaluate=lambda: 1.0, seed_slots={})
    assert (p.patience, p.min_delta, p.train_steps, p.blend_steps, p.cull_threshold) == (
        3,
        1e-3,
        100,
        100,
        0.0,
    )
    assert (p.optimizer, p.group_options, p.agreement, p.slots) == (None, {}, None, {})
    assert p.state_dict() == {
        "best": math.inf,
        "badEvals": 0,
        "stepCount": 0,
        "tried": [],
        "exhausted": None,
        "events": [],
    }


def test_a_refused_kernel_is_reported_and_the_next_one_grown() -> None:
    cat = KernelCatalog()
    cat.add("broken", _broken, 2.0)
    cat.add("good", _lin, 1.0)
    cat.add("wide", lambda: nn.Linear(8, 8), 9.0, (8,))  # never tried: its shape does not fit
    policy = _policy(cat)
    _plateau(policy)
    assert policy.events == [
        {"step": 10, "event": "plateau", "valLoss": 1.0, "best": 1.0},
        {"step": 10, "event": "germinate_failed", "slot": "s", "kernel": "broken",
         "reason": "LoadFailed: RuntimeError: no such kernel"},
        {"step": 10, "event": "germinate", "slot": "s", "kernel": "good"},
    ]  # fmt: skip
    assert policy.tried == {("s", "broken"), ("s", "good")}
    assert policy.slots["s"].state is SeedState.TRAINING and policy.slots["s"].kernel_key == "good"


def test_nothing_to_grow_is_said_once_and_the_state_round_trips() -> None:
    cat = KernelCatalog()
    cat.add("wide", lambda: nn.Linear(8, 8), 9.0, (8,))
    policy = _policy(cat)
    _plateau(policy)
    _plateau(policy, step=20)  # the same situation: no second report
    assert [(e["step"], e["event"]) for e in policy.events] == [(10, "plateau"), (10, "no_kernel")]
    state = policy.state_dict()
    assert state == {
        "best": 1.0,
        "badEvals": 0,
        "stepCount": 20,
        "tried": [],
        "exhausted": [["s"], 1, 0],  # dormant slots, catalog size, pairs tried
        "events": policy.events,
    }
    fresh = _policy(cat)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    _plateau(fresh, step=30)  # restored: still nothing new to say
    assert len(fresh.events) == 2


def test_a_saved_state_is_read_field_by_field() -> None:
    policy = _policy(KernelCatalog())
    state = {
        "best": "0.5",
        "badEvals": 2.0,
        "stepCount": "7",
        "tried": [("s", "k")],
        "exhausted": [["s"], "5", 2],
    }
    policy.load_state_dict(state)
    assert policy.state_dict() == {
        "best": 0.5,
        "badEvals": 2,
        "stepCount": 7,
        "tried": [["s", "k"]],
        "exhausted": [["s"], 5, 2],
        "events": [],
    }
    before = policy.state_dict()
    for bad, error in [
        ({**state, "best": "low"}, "ValueError: could not convert string to float: 'low'"),
        ({**state, "tried": 3}, "TypeError"),
        ({**state, "stepCount": None}, "TypeError"),
        ({**state, "exhausted": [["s"]]}, "IndexError: list index out of range"),
        ({k: v for k, v in state.items() if k != "tried"}, "KeyError: 'tried'"),
    ]:
        with pytest.raises(ValueError, match=f"^not a PlateauPolicy state: {error}"):
            policy.load_state_dict(bad)
    assert policy.state_dict() == before


def test_an_evaluation_without_a_step_keeps_the_step_count() -> None:
    policy = _policy(KernelCatalog())
    for _ in range(3):
        policy.step()
    policy.on_eval(1.0)
    policy.on_eval(1.0)
    assert policy.step_count == 3 and [(e["step"], e["event"]) for e in policy.events] == [
        (3, "plateau"),
        (3, "no_kernel"),
    ]


def test_a_seed_joins_the_optimizer_in_its_own_group_and_leaves_it_when_culled() -> None:
    """contribution 0.5 - 0.75 = -0.25 <= 0: culled; its param group and optimizer state go with it."""
    host = nn.Linear(F, F)
    opt = torch.optim.SGD(host.parameters(), lr=0.1)
    cat = KernelCatalog()
    cat.add("k", _lin)
    policy = _policy(cat, _values(0.5, 0.75), opt, group_options={"lr": 0.5, "momentum": 0.9})
    slot = policy.slots["s"]
    _plateau(policy)
    assert len(opt.param_groups) == 2
    group = opt.param_groups[1]
    assert (group["seed"], group["lr"], group["momentum"]) == ("s", 0.5, 0.9)
    seed_params = slot.seed_parameters()
    assert len(seed_params) == 2 and all(a is b for a, b in zip(group["params"], seed_params, strict=True))
    for p in [*host.parameters(), *seed_params]:
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    policy.step()  # training -> blending
    policy.step()  # alpha 1: decide
    assert policy.events[-2:] == [
        {"step": 11, "event": "blending", "slot": "s", "kernel": "k"},
        {"step": 12, "event": "cull", "slot": "s", "kernel": "k", "contribution": -0.25, "valLoss": 0.5},
    ]
    assert [g.get("seed") for g in opt.param_groups] == [None]
    assert set(opt.state) == set(host.parameters())
    assert [t.reason for t in slot.lifecycle.history[-2:]] == ["contribution -0.25 <= 0", "slot reused"]
    assert slot.state is SeedState.DORMANT and slot.telemetry.contribution == -0.25
    assert (policy.best, policy.bad_evals) == (0.5, 0)


def test_a_kept_seed_says_by_how_much() -> None:
    policy = _policy(KernelCatalog([CatalogEntry("k", _lin)]), _values(0.75, 0.25), cull_threshold=0.125)
    _plateau(policy)
    policy.step()
    policy.step()
    assert policy.events[-1] == {
        "step": 12, "event": "fossilize", "slot": "s", "kernel": "k", "contribution": 0.5, "valLoss": 0.25,
    }  # fmt: skip
    assert policy.slots["s"].lifecycle.history[-1].reason == "contribution 0.5 > 0.125"


def test_a_seed_that_culled_itself_frees_its_slot_and_its_group() -> None:
    opt = torch.optim.SGD(nn.Linear(F, F).parameters(), lr=0.1)
    policy = _policy(KernelCatalog([CatalogEntry("k", _lin)]), optimizer=opt)
    _plateau(policy)
    slot = policy.slots["s"]
    slot.cull("seed forward raised: boom")  # what a slot does when its kernel fails at run time
    policy.step()
    assert policy.events[-1] == {
        "step": 11,
        "event": "cull",
        "slot": "s",
        "reason": "seed forward raised: boom",
    }
    assert slot.state is SeedState.DORMANT and len(opt.param_groups) == 1


def test_a_seed_that_fails_while_measured_is_culled_whatever_it_scored() -> None:
    """The first evaluation (seed off) culls the slot; the contribution looks good but is not kept."""
    holder: dict[str, PlateauPolicy] = {}

    def evaluate() -> float:
        slot = holder["p"].slots["s"]
        if slot.state is SeedState.BLENDING:
            slot.cull("failed during evaluation")
            return 1.0
        return 0.0

    policy = holder["p"] = _policy(KernelCatalog([CatalogEntry("k", _lin)]), evaluate)
    _plateau(policy)
    policy.step()
    policy.step()
    assert policy.events[-1] == {
        "step": 12, "event": "cull", "slot": "s", "kernel": "k", "contribution": 1.0, "valLoss": 1.0,
    }  # fmt: skip
    slot = policy.slots["s"]
    assert [t.reason for t in slot.lifecycle.history[-2:]] == ["failed during evaluation", "slot reused"]
    assert slot.state is SeedState.DORMANT and policy.best == 0.0


class _Agreement:
    """Records what the policy asks and answers as told."""

    def __init__(self, germinate: bool, verdict: bool) -> None:
        self.answers = (germinate, verdict)
        self.calls: list[tuple[str, str, Any]] = []

    def germinate(self, slot: SeedSlot, entry: CatalogEntry) -> bool:
        self.calls.append(("germinate", slot.name, entry.key))
        if self.answers[0]:
            slot.germinate(entry.source, key=entry.key)
        return self.answers[0]

    def verdict(self, slot: SeedSlot, keep: bool) -> bool:
        self.calls.append(("verdict", slot.name, keep))
        return self.answers[1]


@pytest.mark.parametrize(("verdict", "event"), [(True, "fossilize"), (False, "cull")])
def test_with_an_agreement_every_decision_is_the_shared_one(verdict: bool, event: str) -> None:
    """Locally the seed would be culled (contribution -0.25); the shared verdict decides."""
    policy = _policy(KernelCatalog([CatalogEntry("k", _lin)]), _values(0.5, 0.75))
    policy.agreement = agreement = _Agreement(True, verdict)
    _plateau(policy)
    policy.step()
    policy.step()
    assert agreement.calls == [("germinate", "s", "k"), ("verdict", "s", False)]
    assert policy.events[-1]["event"] == event


def test_with_an_agreement_a_refused_germination_leaves_the_slot_dormant() -> None:
    policy = _policy(KernelCatalog([CatalogEntry("k", _lin)]))
    policy.agreement = agreement = _Agreement(False, True)
    _plateau(policy)
    assert agreement.calls == [("germinate", "s", "k")]
    assert [e["event"] for e in policy.events] == ["plateau", "germinate_failed", "no_kernel"]
    assert policy.slots["s"].state is SeedState.DORMANT


def test_a_catalog_of_bundles_is_scored_by_train_speedup_else_speedup(tmp_path: Path) -> None:
    def report(speedup: float, train: float = 0.0) -> ValidationReport:
        return ValidationReport(
            tolerance=1e-5, maxAbsError=0.0, eagerMicros=2.0, compiledMicros=1.0, speedup=speedup,
            trainSpeedup=train,
        )  # fmt: skip

    dirs = {name: tmp_path / name for name in ("a", "b", "c", "d")}
    keys = {}
    for i, (name, update) in enumerate([
        ("a", {"report": report(1.5, 2.5), "inputs": [{"name": "x", "shape": ["batch", 3, 5]}]}),
        ("b", {"report": report(1.2)}),  # no train speedup measured: the forward speedup
        ("c", {"inputs": []}),  # no report, no inputs: score 0, any shape
    ]):  # fmt: skip
        keys[name], _ = make_fake_bundle(dirs[name], seed=i, signed=False)
        write_manifest(dirs[name], read_manifest(dirs[name]).model_copy(update=update))
    dirs["d"].mkdir()  # no manifest: skipped
    cat = KernelCatalog.from_bundles([str(dirs["d"]), dirs["c"], dirs["b"], dirs["a"]])
    assert len(cat) == 3
    assert cat.ranked() == [
        CatalogEntry(keys["a"], dirs["a"], 2.5, (3, 5)),
        CatalogEntry(keys["b"], dirs["b"], 1.2, (4,)),
        CatalogEntry(keys["c"], dirs["c"], 0.0, None),
    ]


def test_a_catalog_of_bundles_leaves_out_the_targets_this_machine_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One Blueprint's Kernels for three targets synced to a CPU node: it is offered what it runs."""
    from esper import devices

    dirs, keys = {}, {}
    for i, target in enumerate(("cpu", "cpu-avx512", "cuda-sm90")):
        dirs[target] = tmp_path / target
        keys[target], _ = make_fake_bundle(dirs[target], seed=i, signed=False)
        write_manifest(dirs[target], read_manifest(dirs[target]).model_copy(update={"target": target}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(devices, "CPUINFO", cpuinfo)

    cpuinfo.write_text("flags\t: avx2 fma f16c avx512f avx512bw avx512cd avx512dq avx512vl\n")
    offered = {e.key for e in KernelCatalog.from_bundles(dirs.values()).ranked()}
    assert offered == {keys["cpu"], keys["cpu-avx512"]}

    cpuinfo.write_text("flags\t: avx2 fma f16c\n")  # an AVX2-only node
    with caplog.at_level(logging.INFO, logger="esper.kasmina"):
        offered = {e.key for e in KernelCatalog.from_bundles(dirs.values()).ranked()}
    assert offered == {keys["cpu"]}
    skipped = [r.getMessage() for r in caplog.records if "left out of the catalog" in r.getMessage()]
    assert len(skipped) == 2
    assert any(keys["cpu-avx512"][:16] in m and "lacks avx512f" in m for m in skipped)
    assert any(keys["cuda-sm90"][:16] in m and "needs a CUDA GPU" in m for m in skipped)


@pytest.mark.parametrize(
    ("per_token", "x_shape", "entries", "grown"),
    [
        (False, (2, 4), [("wide", 2.0, (8,)), ("fit", 1.0, (4,))], "fit"),
        (False, (2, 5, 4), [("pos", 2.0, (4,)), ("seq", 1.0, (5, 4))], "seq"),  # one sample is (5, 4)
        (True, (2, 3, 5, 4), [("seq", 2.0, (5, 4)), ("pos", 1.0, (4,))], "pos"),  # one position is (4,)
        (True, None, [("wide", 2.0, (8,)), ("fit", 1.0, (4,))], "wide"),  # nothing seen yet: any kernel
    ],
)
def test_a_slot_is_offered_only_the_kernels_of_its_shape(
    per_token: bool,
    x_shape: tuple[int, ...] | None,
    entries: list[tuple[str, float, tuple[int, ...]]],
    grown: str,
) -> None:
    slot = SeedSlot("s", nn.Linear(F, F), per_token=per_token)
    if x_shape is not None:
        slot(torch.zeros(x_shape))
    cat = KernelCatalog([CatalogEntry(key, _lin, score, shape) for key, score, shape in entries])
    p = PlateauPolicy(patience=1, min_delta=0.25, catalog=cat, evaluate=lambda: 1.0, seed_slots={"s": slot})
    _plateau(p)
    assert [(e["event"], e.get("kernel")) for e in p.events] == [("plateau", None), ("germinate", grown)]
    assert p.tried == {("s", grown)} and slot.kernel_key == grown


def test_language_model_policy_uses_the_given_catalog_and_judges() -> None:
    cat = KernelCatalog([CatalogEntry("k", _lin)])

    def evaluate() -> float:
        return 1.0

    def held_out() -> float:
        return 2.0

    p = PlateauPolicy.for_language_model(catalog=cat, evaluate=evaluate, contribution=held_out, seed_slots={})
    assert (p.catalog, p.evaluate, p.contribution) == (cat, evaluate, held_out)


def test_a_catalog_entry_scores_zero_unless_told() -> None:
    cat = KernelCatalog()
    cat.add("k", _lin)
    cat.add("low", _lin, -0.5)
    cat.add("high", _lin, 0.5)
    assert [(e.key, e.score) for e in cat.ranked()] == [("high", 0.5), ("k", 0.0), ("low", -0.5)]


def test_a_decision_on_held_out_data_restarts_the_plateau_search() -> None:
    """The held-out numbers say nothing about the plateau's split: best is forgotten, and the next
    evaluation sets it."""
    policy = _policy(
        KernelCatalog([CatalogEntry("k", _lin)]),
        lambda: 9.0,
        contribution=_values(0.75, 0.25),
        cull_threshold=0.125,
    )
    _plateau(policy)
    policy.step()
    policy.step()
    assert policy.events[-1]["event"] == "fossilize" and policy.events[-1]["contribution"] == 0.5
    assert (policy.best, policy.bad_evals) == (math.inf, 0)
    policy.on_eval(3.0, step=13)
    assert (policy.best, policy.bad_evals) == (3.0, 0)


def test_rel_delta_is_a_fraction_below_one_and_kernels_are_not_spread_unless_asked() -> None:
    for bad in (1.0, -0.001):
        with pytest.raises(ValueError, match=rf"^rel_delta must be in \[0, 1\), got {bad}$"):
            PlateauPolicy(catalog=KernelCatalog(), evaluate=lambda: 1.0, seed_slots={}, rel_delta=bad)
    p = PlateauPolicy(catalog=KernelCatalog(), evaluate=lambda: 1.0, seed_slots={}, rel_delta=0.0)
    assert (p.rel_delta, p.spread_kernels) == (0.0, False)


def test_a_bundle_is_grown_only_with_the_sha256_the_catalog_records(tmp_path: Path) -> None:
    key, sha = make_fake_bundle(tmp_path / "b")
    wrong = "0" * 64
    policy = _policy(KernelCatalog([CatalogEntry(key, tmp_path / "b", sha256=wrong)]))
    _plateau(policy)
    failed = policy.events[1]
    assert (failed["event"], failed["kernel"]) == ("germinate_failed", key)
    assert f"sha256 is {sha}, expected {wrong}" in failed["reason"]  # refused before anything is loaded
