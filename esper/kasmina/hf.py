"""Hugging Face interop: a wrapped model saves with `save_pretrained` and comes back with its seeds.

Saving needs nothing from here: a wrapped model's state_dict keeps the bare model's keys (no `.host`
level) and holds only tensors (each slot's state is JSON bytes in `<slot>._extra_state`), so
`model.save_pretrained(dir)` writes an ordinary checkpoint. Transformers' `from_pretrained` then
loads the host's weights into a bare model and reports the slot keys as unexpected.

`from_pretrained(cls, dir, kernel_resolver=...)` is the way back with the seeds: it loads the bare
model with transformers, finds the slots in the checkpoint (their `_extra_state` entries name them),
wraps them, rebuilds each seed's kernel with `kernel_resolver(key)` and loads the slots' entries. A
model that must run without Esper is exported first (`esper.kasmina.export.unwrap`).

Imports transformers only inside `from_pretrained` (through `cls`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esper.kasmina.seed import KernelResolver, KernelRestoreError, SeedSlot, wrap

EXTRA = "_extra_state"


def checkpoint_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a `save_pretrained` directory (one safetensors file or a sharded index)."""
    from safetensors.torch import load_file

    d = Path(path)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(d / f)))
    return out


def slot_states(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """The slots a checkpoint holds: module path -> slot state (the `_extra_state` JSON)."""
    out = {}
    for key, t in tensors.items():
        if not key.endswith("." + EXTRA) or t.dtype != torch.uint8 or t.dim() != 1:
            continue
        try:
            state = json.loads(bytes(t.tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(state, dict) and "version" in state and "state" in state:
            out[key[: -len(EXTRA) - 1]] = state
    return out


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Transformers warns about the slot keys a bare model does not have: expected here."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def from_pretrained(
    cls: Any,
    path: str | os.PathLike[str],
    *,
    kernel_resolver: KernelResolver | None = None,
    **kwargs: Any,
) -> Any:
    """`cls.from_pretrained(path, **kwargs)`, then the checkpoint's seed slots restored.

    Raises KernelRestoreError when a seed's kernel cannot be rebuilt (no resolver, or it failed), and
    when the checkpoint's slot entries do not fit the model.
    """
    with _quiet_transformers():
        model = cls.from_pretrained(path, **kwargs)
    tensors = checkpoint_tensors(path)
    states = slot_states(tensors)
    if not states:
        return model
    restore_slots(model, tensors, states, kernel_resolver)
    return model


def restore_slots(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    states: dict[str, dict[str, Any]],
    kernel_resolver: KernelResolver | None,
) -> dict[str, SeedSlot]:
    """Wrap `model` at the checkpoint's slots (module paths of `states`) and load their entries."""
    made: dict[str, SeedSlot] = {}
    for path, state in states.items():
        sub = model.get_submodule(path)
        if isinstance(sub, SeedSlot):
            made[path] = sub
            continue
        per_token, causal = bool(state.get("perToken", False)), bool(state.get("causal", False))
        made.update(wrap(model, [path], per_token=per_token, causal=causal))
        made[path].name = str(state.get("name", path))
    for s in made.values():
        s.kernel_resolver = kernel_resolver
    prefixes = tuple(p + "." for p in states)
    mine = {k: v for k, v in tensors.items() if k.startswith(prefixes)}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    mine = {k: v.to(device) if v.dtype != torch.uint8 else v for k, v in mine.items()}
    result = model.load_state_dict(mine, strict=False)
    bad = [k for k in result.missing_keys if k.startswith(prefixes)] + list(result.unexpected_keys)
    if bad:
        raise KernelRestoreError(f"checkpoint and model disagree on slot entries: {sorted(bad)[:8]}")
    return made
