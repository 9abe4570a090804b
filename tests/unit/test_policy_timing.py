"""When the plateau policy acts, to the evaluation and the step, worked out by hand from the inputs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from torch import nn

from esper.kasmina import KernelCatalog, PlateauPolicy, SeedSlot, SeedState

F = 4


def _policy(patience: int, min_delta: float, evaluate: Iterator[float] | None = None) -> PlateauPolicy:
    catalog = KernelCatalog()
    catalog.add("k", lambda: nn.Linear(F, F))
    slot = SeedSlot("s", nn.Linear(F, F))
    values = evaluate or iter(())
    return PlateauPolicy(
        patience=patience, min_delta=min_delta, train_steps=3, blend_steps=2,
        catalog=catalog, evaluate=lambda: next(values), seed_slots={"s": slot},
    )  # fmt: skip


def _first_plateau(policy: PlateauPolicy, losses: list[float]) -> int | None:
    """The 1-based evaluation at which the first plateau event appears (evaluations at steps 10, 20...)."""
    for i, loss in enumerate(losses, start=1):
        policy.on_eval(loss, step=10 * i)
        if any(e["event"] == "plateau" for e in policy.events):
            return i
    return None


# Binary-exact values, so `best - min_delta` is exact and the boundary case is a real boundary.
@pytest.mark.parametrize(
    ("patience", "losses", "expected", "best"),
    [
        # best 1.0; three evaluations that are not better by more than 0.25: the 3rd of them fires.
        (3, [1.0, 1.0, 0.875, 0.75], 4, 1.0),
        # exactly best - min_delta is not an improvement (strict `<`): counts as a bad evaluation.
        (1, [1.0, 0.75], 2, 1.0),
        # below it is: the count restarts from the new best 0.5, then 2 bad evaluations fire.
        (2, [1.0, 0.5, 0.5, 0.5], 4, 0.5),
        (2, [1.0, 0.875, 0.5, 0.375, 0.375], 5, 0.5),
        # never a plateau while every evaluation improves by more than min_delta
        (1, [4.0, 3.5, 3.0, 2.5], None, None),
    ],
)
def test_plateau_fires_at_the_exact_evaluation(
    patience: int, losses: list[float], expected: int | None, best: float | None
) -> None:
    policy = _policy(patience, 0.25)
    assert _first_plateau(policy, losses) == expected
    if expected is not None:
        plateau, germinate = policy.events[:2]
        assert plateau == {"step": 10 * expected, "event": "plateau", "valLoss": losses[expected - 1],
                           "best": best}  # fmt: skip
        assert germinate == {"step": 10 * expected, "event": "germinate", "slot": "s", "kernel": "k"}
        assert policy.slots["s"].state is SeedState.TRAINING
    else:
        assert policy.events == [] and policy.slots["s"].state is SeedState.DORMANT


def test_the_count_restarts_after_a_plateau() -> None:
    # patience 2, nothing to grow after the first: a second plateau needs two more bad evaluations.
    policy = _policy(2, 0.25)
    policy.catalog = KernelCatalog()  # an empty catalog: the plateau finds no kernel
    for i, loss in enumerate([1.0, 1.0, 1.0], start=1):
        policy.on_eval(loss, step=i)
    assert [e["event"] for e in policy.events] == ["plateau", "no_kernel"]
    assert policy.bad_evals == 0
    policy.catalog.add("k", lambda: nn.Linear(F, F))  # something new to try
    policy.on_eval(1.0, step=4)
    assert [e["event"] for e in policy.events] == ["plateau", "no_kernel"]
    policy.on_eval(1.0, step=5)
    assert [(e["step"], e["event"]) for e in policy.events[2:]] == [(5, "plateau"), (5, "germinate")]


def test_blending_starts_after_train_steps_and_the_decision_after_blend_steps() -> None:
    # evaluate() at the decision: first with the seed switched off (0.5), then on (0.25): it helps.
    policy = _policy(1, 0.25, evaluate=iter([0.5, 0.25]))
    policy.on_eval(1.0, step=10)
    policy.on_eval(1.0, step=20)  # plateau + germinate at step 20
    assert [(e["step"], e["event"]) for e in policy.events] == [(20, "plateau"), (20, "germinate")]
    seen = []
    for _ in range(6):
        policy.step()
        seen.append((policy.step_count, policy.slots["s"].state))
    # train_steps 3: blending from the 3rd step after germination; blend_steps 2: alpha 1 two steps later
    assert seen == [
        (21, SeedState.TRAINING),
        (22, SeedState.TRAINING),
        (23, SeedState.BLENDING),
        (24, SeedState.BLENDING),
        (25, SeedState.FOSSILIZED),
        (26, SeedState.FOSSILIZED),
    ]
    assert [(e["step"], e["event"]) for e in policy.events[2:]] == [(23, "blending"), (25, "fossilize")]
    assert policy.events[-1]["contribution"] == 0.25 and policy.events[-1]["valLoss"] == 0.25
    assert policy.best == 0.25 and policy.bad_evals == 0


@pytest.mark.parametrize(("base", "current", "event"), [(0.5, 0.25, "cull"), (0.5, 0.125, "fossilize")])
def test_a_seed_must_beat_the_threshold_to_be_kept(base: float, current: float, event: str) -> None:
    """contribution = base - current; kept only if strictly above cull_threshold (0.25 here)."""
    policy = _policy(1, 0.25, evaluate=iter([base, current]))
    policy.cull_threshold = 0.25
    policy.on_eval(1.0, step=10)
    policy.on_eval(1.0, step=20)
    for _ in range(5):
        policy.step()
    assert [e["event"] for e in policy.events] == ["plateau", "germinate", "blending", event]
    assert policy.events[-1]["contribution"] == base - current
