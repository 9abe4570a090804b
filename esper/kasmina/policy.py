"""Tamiyo, kept simple: grow a seed when validation loss plateaus, keep it only if it helps.

Deterministic by design: no randomness of its own, slots visited in module order, kernels ranked by
(score desc, key), every decision from numbers the trainer feeds in. Same data + same torch seed ->
same event list.

Trainer protocol::

    loss.backward(); optimizer.step(); policy.step(); optimizer.zero_grad()
    if step % eval_every == 0: policy.on_eval(evaluate(), step)

`evaluate()` returns the validation loss of the current model (it should switch to eval mode and
no_grad itself); the policy also calls it twice when a blend ends to measure the seed's contribution
`val_loss(alpha=0) - val_loss(alpha=1)`. The slot blends convexly (`y + alpha * (s - y)`), so
alpha=0 is the slot's host output `y` alone and alpha=1 the seed's output `s` in its place: the
contribution is what the current model would lose by dropping the seed now (after the host has
co-adapted to it during the blend), not a proof that growing it beat training the host longer.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from esper.kasmina.lifecycle import LIVE_STATES, SeedState
from esper.kasmina.seed import KernelSource, SeedSlot, slots

log = logging.getLogger("esper.kasmina")

S = SeedState


@dataclass(frozen=True)
class CatalogEntry:
    """A kernel the policy may germinate: where it comes from, how good it looks, what shape it takes."""

    key: str
    source: KernelSource  # a module factory (preferred: a fresh seed each time) or a bundle directory
    score: float = 0.0
    sample_shape: tuple[int, ...] | None = None  # per-sample in/out shape; None: probed at germination
    sha256: str | None = None  # expected manifest sha256 for bundle sources

    def fits(self, sample_shape: tuple[int, ...] | None) -> bool:
        return self.sample_shape is None or sample_shape is None or self.sample_shape == sample_shape


class KernelCatalog:
    """The kernels available to grow, in a deterministic order: score descending, then key."""

    def __init__(self, entries: Iterable[CatalogEntry] = ()) -> None:
        self._entries: dict[str, CatalogEntry] = {}
        for e in entries:
            self._entries[e.key] = e

    def add(
        self,
        key: str,
        source: KernelSource,
        score: float = 0.0,
        sample_shape: tuple[int, ...] | None = None,
        sha256: str | None = None,
    ) -> None:
        self._entries[key] = CatalogEntry(key, source, score, sample_shape, sha256)

    @classmethod
    def from_bundles(cls, bundle_dirs: Iterable[str | os.PathLike[str]]) -> KernelCatalog:
        """A catalog of local bundles, scored by their report's train speedup (manifest only; the
        bundle is verified when a seed loads it). Bundles whose manifest is unreadable are skipped, and
        so are those whose target this machine cannot run: with the Kernels of several targets synced
        (cpu and cpu-avx512, say), a node gets the best it runs and never tries one it cannot."""
        from esper.artifact import ArtifactError, read_manifest
        from esper.devices import check_runtime

        @functools.cache  # per target, once per catalog: the CPU or GPU check reads /proc or the driver
        def runtime_problem(target: str) -> str | None:
            try:
                return check_runtime(target)
            except ValueError as e:  # a target this runtime does not know
                return str(e)

        cat = cls()
        for d in bundle_dirs:
            try:
                m = read_manifest(Path(d))
            except ArtifactError:
                continue
            why = runtime_problem(m.target)
            if why is not None:
                log.info("kernel %s (%s) left out of the catalog: %s", m.key[:16], d, why)
                continue
            score = (m.report.trainSpeedup or m.report.speedup) if m.report else 0.0
            shape = tuple(int(x) for x in m.inputs[0].shape[1:]) if m.inputs else None
            cat.add(m.key, Path(d), score, shape)
        return cat

    def ranked(self, sample_shape: tuple[int, ...] | None = None) -> list[CatalogEntry]:
        es = [e for e in self._entries.values() if e.fits(sample_shape)]
        return sorted(es, key=lambda e: (-e.score, e.key))

    def __len__(self) -> int:
        return len(self._entries)


class Agreement(Protocol):
    """How a germination and a keep/cull verdict become decisions every data-parallel rank shares.

    `PlateauPolicy.agreement` is None in one process; `esper.kasmina.distributed.SeedCoordinator`
    sets it on every rank. `germinate` is called on rank 0 only (the one that decides): the attempt
    is carried out on every rank and succeeds only if it succeeds everywhere. `verdict` is called on
    every rank when a blend ends and returns the decision all of them apply.
    """

    def germinate(self, slot: SeedSlot, entry: CatalogEntry) -> bool: ...

    def verdict(self, slot: SeedSlot, keep: bool) -> bool: ...


class PlateauPolicy:
    """Plateau -> germinate -> train `train_steps` -> blend `blend_steps` -> fossilize or cull.

    A plateau: `patience` evaluations in a row without an improvement of more than
    `max(min_delta, rel_delta * |best|)`. `rel_delta` makes the threshold scale with the loss (a
    language model at loss 2.0 improving 0.2% per evaluation is still learning; an absolute 1e-3
    would call that a plateau at one scale and never at another). `spread_kernels`: a slot tries the
    kernels that no other slot holds first, so two slots do not grow the same top-ranked kernel.
    `contribution`: the loss function that judges a seed when its blend ends (default `evaluate`);
    give it a held-out split that the plateau detection does not watch, so the decision is not
    fitted to the data that triggered it. `for_language_model` has documented defaults.
    """

    def __init__(
        self,
        patience: int = 3,
        min_delta: float = 1e-3,
        train_steps: int = 100,
        blend_steps: int = 100,
        cull_threshold: float = 0.0,
        *,
        catalog: KernelCatalog,
        evaluate: Callable[[], float],
        model: nn.Module | None = None,
        seed_slots: Mapping[str, SeedSlot] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        group_options: Mapping[str, Any] | None = None,
        rel_delta: float = 0.0,
        spread_kernels: bool = False,
        contribution: Callable[[], float] | None = None,
    ) -> None:
        if (model is None) == (seed_slots is None):
            raise ValueError("give exactly one of model or seed_slots")
        if not 0.0 <= rel_delta < 1.0:
            raise ValueError(f"rel_delta must be in [0, 1), got {rel_delta}")
        self.rel_delta, self.spread_kernels = rel_delta, spread_kernels
        # None: judge seeds with `evaluate`, looked up at each use (a data-parallel coordinator
        # replaces `evaluate` with its mean over ranks after construction).
        self.contribution: Callable[[], float] | None = contribution
        self.patience, self.min_delta = patience, min_delta
        self.train_steps, self.blend_steps = train_steps, blend_steps
        self.cull_threshold = cull_threshold
        self.catalog, self.evaluate = catalog, evaluate
        self.slots = dict(slots(model) if model is not None else seed_slots or {})
        self.optimizer = optimizer
        self.group_options = dict(group_options or {})
        self.best = math.inf
        self.bad_evals = 0
        self.step_count = 0
        self.tried: set[tuple[str, str]] = set()  # (slot, kernel) pairs already grown or refused
        self.events: list[dict[str, Any]] = []
        self._exhausted: tuple[Any, ...] | None = None  # what was true when nothing could be grown
        self.agreement: Agreement | None = None  # set by a data-parallel coordinator

    @classmethod
    def for_language_model(
        cls,
        *,
        catalog: KernelCatalog,
        evaluate: Callable[[], float],
        contribution: Callable[[], float] | None = None,
        **overrides: Any,
    ) -> PlateauPolicy:
        """Defaults for a small language model trained with AdamW, evaluated every ~50 steps on a
        validation split (cross-entropy in nats): a plateau is 3 evaluations without a 0.5% relative
        gain; a seed trains 200 steps in isolation and blends over 200; it is kept if dropping it
        would cost more than 0.002 nats on `contribution`'s held-out split; each slot tries a kernel
        the other slots do not hold first. Pass `model=` or `seed_slots=`, `optimizer=`, and any
        other argument to override."""
        opts: dict[str, Any] = dict(
            patience=3, min_delta=0.0, rel_delta=0.005, train_steps=200, blend_steps=200,
            cull_threshold=0.002, spread_kernels=True,
        )  # fmt: skip
        opts.update(overrides)
        return cls(catalog=catalog, evaluate=evaluate, contribution=contribution, **opts)

    def _event(self, event: str, **fields: Any) -> None:
        self.events.append({"step": self.step_count, "event": event, **fields})

    def state_dict(self) -> dict[str, Any]:
        """The policy's own state, JSON-able (the slots' state travels in the model's state_dict)."""
        ex = self._exhausted
        return {
            "best": self.best,
            "badEvals": self.bad_evals,
            "stepCount": self.step_count,
            "tried": sorted([list(t) for t in self.tried]),
            "exhausted": None if ex is None else [list(ex[0]), ex[1], ex[2]],
            "events": list(self.events),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`; a missing or mistyped field raises ValueError and changes nothing."""
        try:
            best, bad, count = float(state["best"]), int(state["badEvals"]), int(state["stepCount"])
            tried = {(str(a), str(b)) for a, b in state["tried"]}
            ex = state.get("exhausted")
            exhausted = None if ex is None else (tuple(str(n) for n in ex[0]), int(ex[1]), int(ex[2]))
            events = [dict(e) for e in state.get("events", [])]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ValueError(f"not a PlateauPolicy state: {type(e).__name__}: {e}") from None
        self.best, self.bad_evals, self.step_count = best, bad, count
        self.tried, self._exhausted, self.events = tried, exhausted, events

    def active(self) -> SeedSlot | None:
        return next((s for s in self.slots.values() if s.state in LIVE_STATES), None)

    def on_eval(self, val_loss: float, step: int | None = None) -> None:
        """Feed one validation loss; on a plateau (and no seed growing) germinate a seed."""
        if step is not None:
            self.step_count = step
        threshold = self.min_delta  # as given, even negative, when no relative threshold is set
        if self.rel_delta and math.isfinite(self.best):
            threshold = max(self.min_delta, self.rel_delta * abs(self.best))
        if val_loss < self.best - threshold:
            self.best, self.bad_evals = val_loss, 0
        else:
            self.bad_evals += 1
        if self.bad_evals >= self.patience and self.active() is None:
            self.bad_evals = 0
            if self._exhausted == self._situation():
                return  # nothing new to try since the last plateau: say it once
            self._event("plateau", valLoss=val_loss, best=self.best)
            self._grow()

    def step(self) -> None:
        """One optimizer step: step every slot, then move the growing seed along its lifecycle."""
        self.step_count += 1
        for s in self.slots.values():
            s.step()
            if s.state is S.CULLED:  # culled on its own (the seed raised): free the slot again
                self._drop_group(s)
                self._event("cull", slot=s.name, reason=s.telemetry.last_error)
                s.reset()
        slot = self.active()
        if slot is None:
            return
        if slot.state is S.TRAINING and slot.steps_in_state >= self.train_steps:
            slot.start_blending(blend_steps=self.blend_steps)
            self._event("blending", slot=slot.name, kernel=slot.kernel_key)
        elif slot.state is S.BLENDING and slot.alpha >= 1.0:
            self._decide(slot)

    def _grow(self) -> None:
        for slot in self.slots.values():
            if slot.state is not S.DORMANT:
                continue
            for entry in self._ranked_for(slot):
                if (slot.name, entry.key) in self.tried:
                    continue
                self.tried.add((slot.name, entry.key))
                if self.agreement is not None:
                    ok = self.agreement.germinate(slot, entry)
                else:
                    ok = slot.germinate(entry.source, key=entry.key, expected_sha256=entry.sha256)
                if not ok:
                    self._event("germinate_failed", slot=slot.name, kernel=entry.key,
                                reason=slot.telemetry.last_error)  # fmt: skip
                    continue
                self.start_seed(slot)
                self._event("germinate", slot=slot.name, kernel=entry.key)
                return
        self._exhausted = self._situation()
        self._event("no_kernel")

    def start_seed(self, slot: SeedSlot) -> None:
        """A germinated seed joins the optimizer (its own param group) and starts training."""
        if self.optimizer is not None:
            self.optimizer.add_param_group(slot.param_group(**self.group_options))
        slot.start_training()

    def _ranked_for(self, slot: SeedSlot) -> list[CatalogEntry]:
        """The catalog's ranking for this slot's activation (one position's for a per-token slot);
        with `spread_kernels`, kernels that no other slot holds come first."""
        shape = slot.telemetry.activation_shape
        if slot.per_token and shape is not None:
            shape = shape[-1:]
        ranked = self.catalog.ranked(shape)
        if not self.spread_kernels:
            return ranked
        held = {s.kernel_key for s in self.slots.values() if s is not slot and s.kernel_key}
        return sorted(ranked, key=lambda e: e.key in held)  # stable: keeps the ranking within each part

    def _situation(self) -> tuple[Any, ...]:
        dormant = tuple(n for n, s in self.slots.items() if s.state is S.DORMANT)
        return dormant, len(self.catalog), len(self.tried)

    def _decide(self, slot: SeedSlot) -> None:
        # alpha is 1 here: `current` is the model with the seed's output replacing y, `base` without it.
        judge = self.contribution or self.evaluate
        with slot.alpha_override(0.0):
            base = float(judge())
        current = float(judge())
        contribution = base - current
        slot.telemetry.contribution = contribution
        keep = contribution > self.cull_threshold and slot.state is not S.CULLED  # failed while measured
        if self.agreement is not None:
            keep = self.agreement.verdict(slot, keep)
        if keep:
            slot.fossilize(reason=f"contribution {contribution:.6g} > {self.cull_threshold:g}")
            self._event("fossilize", slot=slot.name, kernel=slot.kernel_key, contribution=contribution,
                        valLoss=current)  # fmt: skip
        else:
            key = slot.kernel_key or slot.telemetry.kernel_key
            self._drop_group(slot)
            if slot.state is not S.CULLED:  # else it failed while being measured, and culled itself
                slot.cull(f"contribution {contribution:.6g} <= {self.cull_threshold:g}")
            slot.reset()
            self._event("cull", slot=slot.name, kernel=key, contribution=contribution, valLoss=base)
        # Both numbers are on the plateau's split only when `contribution` is `evaluate`; otherwise
        # the next evaluation sets a new best.
        self.best = min(base, current) if self.contribution is None else math.inf
        self.bad_evals = 0

    def _drop_group(self, slot: SeedSlot) -> None:
        """Remove a culled seed's param group and optimizer state (they would pin its memory)."""
        if self.optimizer is None:
            return
        opt = self.optimizer
        for g in [g for g in opt.param_groups if g.get("seed") == slot.name]:
            opt.param_groups.remove(g)
            for p in g["params"]:
                opt.state.pop(p, None)
