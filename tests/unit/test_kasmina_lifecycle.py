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


def test_illegal_transition_message_names_what_is_allowed() -> None:
    with pytest.raises(IllegalTransition) as ei:
        Lifecycle("blocks.0", state=S.TRAINING).transition(S.DORMANT)
    assert str(ei.value) == (
        "blocks.0: illegal seed transition training -> dormant; allowed from training: blending, culled"
    )
    assert str(IllegalTransition(S.DORMANT, S.FOSSILIZED)) == (  # no place given: no prefix
        "illegal seed transition dormant -> fossilized; allowed from dormant: germinated"
    )
    with pytest.raises(IllegalTransition) as ei:
        Lifecycle(state=S.FOSSILIZED).transition(S.CULLED)  # unnamed: no prefix
    assert str(ei.value) == (
        "illegal seed transition fossilized -> culled; allowed from fossilized: none (terminal)"
    )


def test_defaults_and_state_given_by_value() -> None:
    lc = Lifecycle()
    assert (lc.name, lc.state, lc.history, lc.on_transition) == ("", S.DORMANT, [], None)
    t = lc.transition("germinated")  # type: ignore[arg-type]  # a JSON value is accepted
    assert lc.state is S.GERMINATED and t == Transition(0, S.DORMANT, S.GERMINATED, "")


def test_the_callback_sees_the_new_state() -> None:
    states: list[SeedState] = []
    lc = Lifecycle(state=S.DORMANT)
    lc.on_transition = lambda t: states.append(lc.state)
    lc.transition(S.GERMINATED)
    assert states == [S.GERMINATED]


def test_transition_json_is_plain_values() -> None:
    t = Transition(3, S.DORMANT, S.GERMINATED, "kernel k")
    assert t.to_json() == {"step": 3, "from_state": "dormant", "to_state": "germinated", "reason": "kernel k"}
    assert Transition.from_json({"step": "5", "from_state": "training", "to_state": "culled"}) == Transition(
        5, S.TRAINING, S.CULLED, ""
    )


def test_restore_sets_state_and_copies_history() -> None:
    history = [Transition(1, S.DORMANT, S.GERMINATED), Transition(2, S.GERMINATED, S.TRAINING)]
    lc = Lifecycle("s")
    lc.restore("training", history)  # type: ignore[arg-type]
    assert lc.state is S.TRAINING and lc.history == history
    history.append(Transition(3, S.TRAINING, S.BLENDING))
    assert len(lc.history) == 2  # the checkpoint's list is not shared
    lc.transition(S.BLENDING, step=3)
    assert [t.step for t in lc.history] == [1, 2, 3]
