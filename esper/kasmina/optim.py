"""Optimizer checkpoints of a growing model: seed parameter groups come back with their state.

A seed's parameters live in their own param group (`slot.param_group()`, tagged `"seed": <slot>`),
added when it germinated. A fresh optimizer has only the host's groups, so
`optimizer.load_state_dict(saved)` fails (group counts differ) or, worse, pairs the wrong tensors.
`load_optimizer_state(optimizer, model, saved)` first rebuilds the seed groups, in the saved order,
from the model's slots (restore the model first), then loads the state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from esper.kasmina.seed import slots


def seed_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimizer's seed param groups (those tagged with `"seed"`)."""
    return [g for g in optimizer.param_groups if "seed" in g]


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict[str, Any]) -> None:
    """Rebuild `optimizer`'s seed groups as `state` (an `optimizer.state_dict()`) has them, then load it.

    Host groups must already match (the optimizer was built as before). Raises ValueError, with the
    optimizer unchanged, when a saved seed group names a slot the model lacks or holds another number
    of parameters than that slot's seed.
    """
    by_name = slots(model)
    saved = state.get("param_groups", [])
    host_saved = [g for g in saved if "seed" not in g]
    host_now = [g for g in optimizer.param_groups if "seed" not in g]
    if len(host_saved) != len(host_now):
        raise ValueError(
            f"the saved state has {len(host_saved)} host param group(s), the optimizer {len(host_now)}"
        )
    rebuilt: list[dict[str, Any]] = []
    for g in saved:
        if "seed" not in g:
            continue
        slot = by_name.get(g["seed"])
        if slot is None:
            raise ValueError(f"saved param group of seed {g['seed']!r}: the model has no such slot")
        params = slot.seed_parameters()
        if len(params) != len(g["params"]):
            raise ValueError(
                f"seed {g['seed']!r}: the saved group has {len(g['params'])} parameters, "
                f"the slot's seed {len(params)}"
            )
        options = {k: v for k, v in g.items() if k != "params"}
        rebuilt.append({"params": params, **options})
    for g in seed_groups(optimizer):  # dropped with their state, then re-added in the saved order
        optimizer.param_groups.remove(g)
        for p in g["params"]:
            optimizer.state.pop(p, None)
    for g in rebuilt:
        optimizer.add_param_group(g)
    # Groups in the saved order: host groups first as built, seed groups where they were saved.
    order = iter(host_now)
    seeds = iter(rebuilt)
    optimizer.param_groups[:] = [next(seeds) if "seed" in g else next(order) for g in saved]
    optimizer.load_state_dict(state)
