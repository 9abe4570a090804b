"""The plateau policy on language-model scales: relative thresholds, kernels spread over slots,
contributions judged on a held-out split, the documented defaults."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from esper.kasmina import KernelCatalog, PlateauPolicy, SeedSlot, SeedState, wrap

S = SeedState
F = 8


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(F, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


def catalog() -> KernelCatalog:
    cat = KernelCatalog()
    cat.add("top", Residual, score=2.0)
    cat.add("other", Residual, score=1.0)
    return cat


def two_slots() -> tuple[nn.Module, dict[str, SeedSlot]]:
    model = nn.Sequential(nn.Linear(F, F), nn.Linear(F, F))
    ss = wrap(model, ["0", "1"])
    model(torch.randn(2, F))  # shapes recorded
    return model, ss


def policy(model: nn.Module, evaluate: Callable[[], float], **kw: object) -> PlateauPolicy:
    opts: dict[str, object] = {"patience": 3, "train_steps": 1, "blend_steps": 1}
    opts.update(kw)
    return PlateauPolicy(catalog=catalog(), evaluate=evaluate, model=model, **opts)  # type: ignore[arg-type]


def slow_losses(n: int) -> list[float]:
    """A model still learning slowly: 2.0, then 0.1% lower at every evaluation."""
    return [2.0 * 0.999**i for i in range(n)]


def test_an_absolute_threshold_never_sees_a_slow_plateau_a_relative_one_does() -> None:
    model, _ = two_slots()
    absolute = policy(model, lambda: 0.0, min_delta=1e-3)
    for i, loss in enumerate(slow_losses(20)):
        absolute.on_eval(loss, i)
    assert [e["event"] for e in absolute.events] == []  # each step gains 0.002 > 1e-3: "improving"

    model, _ = two_slots()
    relative = policy(model, lambda: 0.0, min_delta=0.0, rel_delta=0.005)
    for i, loss in enumerate(slow_losses(4)):
        relative.on_eval(loss, i)
    # evaluation 0 sets best = 2.0; 1..3 gain < 0.5% of 2.0 = 0.01 each: the third is the plateau
    assert [(e["event"], e["step"]) for e in relative.events][:2] == [("plateau", 3), ("germinate", 3)]


def test_rel_delta_out_of_range_is_refused() -> None:
    model, _ = two_slots()
    with pytest.raises(ValueError, match=r"rel_delta must be in \[0, 1\), got 1.5"):
        policy(model, lambda: 0.0, rel_delta=1.5)


def grow_twice(spread: bool) -> tuple[list[str | None], int, int]:
    """Two plateaus, each growing a seed that the held-out split says helps. Returns the kernels the
    two slots hold and how often `evaluate` and `contribution` were called."""
    model, ss = two_slots()
    calls = {"evaluate": 0, "contribution": 0}

    def evaluate() -> float:
        calls["evaluate"] += 1
        return 1.0

    def held_out() -> float:
        calls["contribution"] += 1
        without_seed = any(s._alpha_override == 0.0 for s in ss.values())
        return 1.0 if without_seed else 0.5

    p = policy(model, evaluate, spread_kernels=spread, contribution=held_out, cull_threshold=0.1)
    for _ in range(2):
        for i in range(4):
            p.on_eval(1.0, i)  # flat: a plateau at the fourth
        for _ in range(3):  # germinated -> training -> blending -> fossilized
            p.step()
    assert [s.state for s in ss.values()] == [S.FOSSILIZED, S.FOSSILIZED], p.events
    return [s.kernel_key for s in ss.values()], calls["evaluate"], calls["contribution"]


def test_slots_try_different_kernels_and_seeds_are_judged_on_held_out_data() -> None:
    kernels, evaluations, contributions = grow_twice(spread=True)
    assert kernels == ["top", "other"]
    assert (evaluations, contributions) == (0, 4)  # two decisions, each with and without the seed
    kernels, _, _ = grow_twice(spread=False)
    assert kernels == ["top", "top"]


def test_language_model_defaults_and_overrides() -> None:
    model, _ = two_slots()
    p = PlateauPolicy.for_language_model(catalog=catalog(), evaluate=lambda: 0.0, model=model)
    assert (p.patience, p.min_delta, p.rel_delta, p.train_steps, p.blend_steps) == (3, 0.0, 0.005, 200, 200)
    # contribution None: seeds are judged by `evaluate`, looked up when used
    assert (p.cull_threshold, p.spread_kernels, p.contribution) == (0.002, True, None)
    q = PlateauPolicy.for_language_model(catalog=catalog(), evaluate=lambda: 0.0, model=model, patience=5)
    assert q.patience == 5
