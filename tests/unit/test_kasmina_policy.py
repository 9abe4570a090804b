"""The plateau policy on a tiny synthetic task: deterministic, fossilizes a helpful seed, culls otherwise."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from esper.kasmina import KernelCatalog, PlateauPolicy, SeedState, wrap

H = 16


class ResidualSeed(nn.Module):
    """x + f(x), f's last layer at zero: the seed starts as the identity (a residual Blueprint's
    shape; the slot's convex blend then moves from y to y + f(y))."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(H, 32), nn.Tanh(), nn.Linear(32, H))
        nn.init.zeros_(self.f[2].weight)
        nn.init.zeros_(self.f[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


def mlp_seed() -> nn.Module:
    return ResidualSeed()


def catalog() -> KernelCatalog:
    cat = KernelCatalog()
    cat.add("mlp-b", mlp_seed, score=1.0)
    cat.add("mlp-a", mlp_seed, score=2.0)
    cat.add("too-wide", lambda: nn.Linear(64, 64), score=9.0, sample_shape=(64,))
    return cat


def run(cull_threshold: float = 0.0, steps: int = 300) -> tuple[list[dict[str, Any]], PlateauPolicy]:
    torch.manual_seed(0)
    x, xv = torch.randn(512, 4), torch.randn(256, 4)

    def target(t: torch.Tensor) -> torch.Tensor:
        return torch.sin(2 * t).sum(1, keepdim=True)

    y, yv = target(x), target(xv)
    model = nn.Sequential(nn.Linear(4, H), nn.Linear(H, 1))  # linear host: it plateaus fast
    wrap(model, at=["0"], sample_every=5)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def evaluate() -> float:
        with torch.no_grad():
            return float(nn.functional.mse_loss(model(xv), yv))

    policy = PlateauPolicy(
        patience=2, min_delta=1e-3, train_steps=60, blend_steps=30, cull_threshold=cull_threshold,
        catalog=catalog(), evaluate=evaluate, model=model, optimizer=opt, group_options={"lr": 0.01},
    )  # fmt: skip
    for step in range(1, steps + 1):
        i = torch.randint(0, 512, (64,))
        nn.functional.mse_loss(model(x[i]), y[i]).backward()
        opt.step()
        policy.step()
        opt.zero_grad()
        if step % 10 == 0:
            policy.on_eval(evaluate(), step)
    return policy.events, policy


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


def test_same_seed_same_events_and_a_helpful_seed_is_kept() -> None:
    events, policy = run()
    assert events == run()[0]
    assert kinds(events)[:4] == ["plateau", "germinate", "blending", "fossilize"], events
    germ = events[1]
    assert germ["kernel"] == "mlp-a" and germ["slot"] == "0"  # best score that fits
    assert events[3]["contribution"] > 0
    assert policy.slots["0"].state is SeedState.FOSSILIZED


def test_unhelpful_seed_is_culled_its_group_dropped_and_the_slot_reused() -> None:
    events, policy = run(cull_threshold=1e9, steps=400)
    k = kinds(events)
    assert k[:4] == ["plateau", "germinate", "blending", "cull"], events
    # the slot is reused for the next-best kernel, never the same (slot, kernel) pair twice
    assert [e["kernel"] for e in events if e["event"] == "germinate"] == ["mlp-a", "mlp-b"]
    assert k.count("cull") == 2 and k[-1] == "no_kernel" and k.count("no_kernel") == 1
    assert policy.slots["0"].state is SeedState.DORMANT
    assert policy.optimizer is not None
    assert [g for g in policy.optimizer.param_groups if "seed" in g] == []
    assert len(policy.optimizer.state) == 4  # only the host's params keep Adam state
