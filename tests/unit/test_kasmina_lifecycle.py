"""The transition table is the only way states change: every pair outside it raises."""

from __future__ import annotations

import itertools

import pytest

from esper.kasmina.lifecycle import (
    IDENTITY_STATES,
    KERNEL_STATES,
    LIVE_STATES,
    TRANSITIONS,
    IllegalTransition,
    Lifecycle,
    SeedState,
    Transition,
    can_transition,
)

S = SeedState
# The documented life of a seed, written out by hand (not read from TRANSITIONS, which is under test).
LEGAL = [
    (S.DORMANT, S.GERMINATED),
    (S.GERMINATED, S.TRAINING),
    (S.GERMINATED, S.CULLED),
    (S.TRAINING, S.BLENDING),
    (S.TRAINING, S.CULLED),
    (S.BLENDING, S.FOSSILIZED),
    (S.BLENDING, S.CULLED),
    (S.CULLED, S.DORMANT),
]
ILLEGAL = [(a, b) for a, b in itertools.product(SeedState, SeedState) if (a, b) not in LEGAL]


def test_table_is_the_documented_one() -> None:
    assert len(SeedState) == 6 and len(ILLEGAL) == 36 - 8
    assert {(a, b) for a, allowed in TRANSITIONS.items() for b in allowed} == set(LEGAL)
    assert TRANSITIONS[S.FOSSILIZED] == frozenset()
    assert [can_transition(a, b) for a, b in LEGAL] == [True] * len(LEGAL)
    assert [can_transition(a, b) for a, b in ILLEGAL] == [False] * len(ILLEGAL)


def test_state_groups() -> None:
    assert {S.GERMINATED, S.TRAINING, S.BLENDING} == LIVE_STATES
    assert {S.DORMANT, S.GERMINATED, S.CULLED} == IDENTITY_STATES
    assert {S.GERMINATED, S.TRAINING, S.BLENDING, S.FOSSILIZED} == KERNEL_STATES


@pytest.mark.parametrize(("src", "dst"), LEGAL, ids=[f"{a.value}->{b.value}" for a, b in LEGAL])
def test_legal_transition_is_recorded(src: SeedState, dst: SeedState) -> None:
    seen: list[Transition] = []
    lc = Lifecycle("s", state=src, on_transition=seen.append)
    t = lc.transition(dst, step=7, reason="why")
    assert lc.state is dst
    assert lc.history == [t] == seen
    assert (t.step, t.from_state, t.to_state, t.reason) == (7, src, dst, "why")


@pytest.mark.parametrize(("src", "dst"), ILLEGAL, ids=[f"{a.value}->{b.value}" for a, b in ILLEGAL])
def test_illegal_transition_raises_and_changes_nothing(src: SeedState, dst: SeedState) -> None:
    lc = Lifecycle("blocks.0", state=src)
    with pytest.raises(IllegalTransition) as ei:
        lc.transition(dst)
    assert (ei.value.from_state, ei.value.to_state) == (src, dst)
    assert f"{src.value} -> {dst.value}" in str(ei.value) and "blocks.0" in str(ei.value)
    assert lc.state is src and lc.history == []


def test_full_life_and_json_round_trip() -> None:
    lc = Lifecycle()
    for i, s in enumerate([S.GERMINATED, S.TRAINING, S.CULLED, S.DORMANT, S.GERMINATED, S.TRAINING,
                           S.BLENDING, S.FOSSILIZED]):  # fmt: skip
        lc.transition(s, step=i)
    assert [Transition.from_json(t.to_json()) for t in lc.history] == lc.history
    with pytest.raises(IllegalTransition, match="terminal"):
        lc.transition(S.CULLED)
