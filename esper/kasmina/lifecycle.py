"""The seed lifecycle: states, the one transition table, and a recorded history.

Every state change of a seed goes through `Lifecycle.transition`, so an illegal move (fossilizing a
dormant seed, reviving a fossil) is an error at the call site rather than a silently wrong model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


class SeedState(StrEnum):
    """Where a seed is in its life. The value is the lowercase name (JSON, metrics labels)."""

    DORMANT = "dormant"
    GERMINATED = "germinated"
    TRAINING = "training"
    BLENDING = "blending"
    FOSSILIZED = "fossilized"
    CULLED = "culled"


S = SeedState
#: Allowed next states. Fossilized is terminal; culled returns the slot to dormant for reuse.
TRANSITIONS: dict[SeedState, frozenset[SeedState]] = {
    S.DORMANT: frozenset({S.GERMINATED}),
    S.GERMINATED: frozenset({S.TRAINING, S.CULLED}),
    S.TRAINING: frozenset({S.BLENDING, S.CULLED}),
    S.BLENDING: frozenset({S.FOSSILIZED, S.CULLED}),
    S.FOSSILIZED: frozenset(),
    S.CULLED: frozenset({S.DORMANT}),
}
#: States in which a kernel is installed and may still be culled.
LIVE_STATES: frozenset[SeedState] = frozenset({S.GERMINATED, S.TRAINING, S.BLENDING})
#: States whose forward is the exact identity on the host output.
IDENTITY_STATES: frozenset[SeedState] = frozenset({S.DORMANT, S.GERMINATED, S.CULLED})
#: States that hold a kernel (and so need one rebuilt when a checkpoint is restored).
KERNEL_STATES: frozenset[SeedState] = frozenset({S.GERMINATED, S.TRAINING, S.BLENDING, S.FOSSILIZED})


class IllegalTransition(RuntimeError):
    """A state change the transition table does not allow."""

    def __init__(self, from_state: SeedState, to_state: SeedState, where: str = "") -> None:
        self.from_state = from_state
        self.to_state = to_state
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[from_state])) or "none (terminal)"
        prefix = f"{where}: " if where else ""
        super().__init__(
            f"{prefix}illegal seed transition {from_state.value} -> {to_state.value}; "
            f"allowed from {from_state.value}: {allowed}"
        )


@dataclass(frozen=True)
class Transition:
    """One recorded state change."""

    step: int
    from_state: SeedState
    to_state: SeedState
    reason: str = ""

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["from_state"], d["to_state"] = self.from_state.value, self.to_state.value
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Transition:
        return cls(int(d["step"]), S(d["from_state"]), S(d["to_state"]), str(d.get("reason", "")))


def can_transition(from_state: SeedState, to_state: SeedState) -> bool:
    return to_state in TRANSITIONS[from_state]


class Lifecycle:
    """The current state plus the history of how it got there; `on_transition` feeds telemetry."""

    def __init__(
        self,
        name: str = "",
        state: SeedState = S.DORMANT,
        on_transition: Callable[[Transition], None] | None = None,
    ) -> None:
        self.name = name
        self.state = state
        self.history: list[Transition] = []
        self.on_transition = on_transition

    def transition(self, to_state: SeedState, step: int = 0, reason: str = "") -> Transition:
        """Move to `to_state` or raise IllegalTransition (the state is then unchanged)."""
        to_state = S(to_state)
        if not can_transition(self.state, to_state):
            raise IllegalTransition(self.state, to_state, self.name)
        t = Transition(step, self.state, to_state, reason)
        self.state = to_state
        self.history.append(t)
        if self.on_transition is not None:
            self.on_transition(t)
        return t

    def restore(self, state: SeedState, history: list[Transition]) -> None:
        """Set state and history from a checkpoint (no table check: the checkpoint was legal)."""
        self.state = S(state)
        self.history = list(history)
