"""Growth that stays consistent across data-parallel ranks.

In a data-parallel job every rank holds a replica of the model. A seed decision taken by one rank
alone (its own validation loss, its own sidecar's kernels) would grow different seeds on different
ranks, and the next collective would hang or the replicas would silently diverge. `SeedCoordinator`
makes every seed decision a shared one:

- **Inputs are reduced.** At each evaluation every rank sends its local validation loss and the
  kernels its sidecar has delivered (key -> manifest sha256) in one `all_gather_object`; every rank
  computes the same mean (summed in rank order, so bit-identical) and the same set of kernels that
  *every* rank holds with the same sha256. The policy's own `evaluate` (used when a blend ends to
  measure the seed's contribution) is wrapped the same way.
- **Rank 0 decides.** Only rank 0 runs the plateau policy's evaluation step, over a catalog cut down
  to the common kernels: a kernel one rank's sidecar has not delivered yet is not a candidate, so a
  late pod delays germination and never splits the ranks. Each germination it attempts is broadcast
  (slot, kernel key, manifest sha256, step), carried out on every rank, and kept only if every rank
  loaded and verified it (an all-gather of the outcomes); otherwise every rank rolls it back. The
  seed's initial parameters are then broadcast from rank 0. When the evaluation is over, rank 0 broadcasts its
  policy state and new events, and the other ranks take them as theirs. The keep/cull verdict at the
  end of a blend is rank 0's, unless the seed failed on some rank while it was being measured.
- **Seed parameters are trained data-parallel outside DDP.** The host is wrapped in
  `DistributedDataParallel` once, before any seed exists, with every seed parameter excluded
  (`ignore_seed_parameters`); seeds add parameters mid-run, which a built DDP cannot take. After
  `backward()`, `sync_grads()` averages the gradients of every seed (live or fossilized) in one
  flattened all-reduce on a dedicated process group (so it never interleaves with DDP's bucketed
  all-reduces). With every slot dormant it is one dict check: no collective. A seed that failed on
  one rank (culled on the spot by its slot) raises a flag in the same buffer, and every rank culls it.
  Chosen over re-wrapping the model in DDP at each event (a full rebuild of the reducer's buckets and
  a parameter broadcast each time, and a DDP built with a live seed breaks when that seed is culled)
  and over FSDP2 per seed (sharding a seed of a few thousand parameters costs more in collectives
  than it saves in memory).

Every method here is collective: each rank must call it at the same point of the training loop.
Trainer protocol (each rank)::

    loss = loss_fn(ddp(x_shard), y_shard); loss.backward()   # DDP averages the host's gradients
    coordinator.sync_grads()                                  # the seeds' gradients (no-op if none)
    optimizer.step(); policy.step(); optimizer.zero_grad()
    if step % eval_every == 0: coordinator.on_eval(local_val_loss, step)

A checkpoint is the model's `state_dict()` (slots, seeds and their kernel keys included), the
optimizer's and `coordinator.state_dict()`: none of it depends on the number of ranks, so it restores
on any rank count. A stuck peer is bounded by the process groups' timeout, not waited on forever.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from esper.kasmina.lifecycle import KERNEL_STATES, SeedState
from esper.kasmina.policy import CatalogEntry, KernelCatalog, PlateauPolicy
from esper.kasmina.seed import SeedSlot

S = SeedState
DEFAULT_TIMEOUT = timedelta(minutes=5)


class RanksDiverged(RuntimeError):
    """Ranks that should hold identical state do not (a bug or a rank that skipped a call)."""


def seed_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of every seed parameter and buffer in `model` (none while all are dormant)."""
    out = []
    for name, slot in model.named_modules():
        if isinstance(slot, SeedSlot) and slot.seed is not None:
            prefix = f"{name}.seed." if name else "seed."
            out += [prefix + n for n, _ in slot.seed.named_parameters()]
            out += [prefix + n for n, _ in slot.seed.named_buffers()]
    return out


def ignore_seed_parameters(model: nn.Module) -> None:
    """Keep every seed parameter out of a `DistributedDataParallel` built on `model` afterwards.

    Call before wrapping: a model restored from a checkpoint may already hold seeds, and a DDP that
    owns a live seed's parameters fails at the first step after that seed is culled. The coordinator
    averages seed gradients itself (`SeedCoordinator.sync_grads`).
    """
    names = seed_parameter_names(model)
    if names:
        from torch.nn.parallel import DistributedDataParallel

        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


class SeedCoordinator:
    """Makes a `PlateauPolicy`'s seed decisions shared by every rank of a data-parallel job.

    Collective: construct it on every rank at the same point (it creates two process groups: one gloo
    group for the control messages, which stay on the CPU whatever the training backend, and one of the
    default backend for the seeds' gradients and parameters), after wrapping the slots and after
    restoring a checkpoint, if any.
    """

    def __init__(
        self,
        policy: PlateauPolicy,
        *,
        timeout: timedelta = DEFAULT_TIMEOUT,
        control_group: Any = None,
        seed_group: Any = None,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("SeedCoordinator needs torch.distributed initialised (init_process_group)")
        if getattr(policy, "agreement", None) is not None:
            raise ValueError("this policy already has a coordinator")
        self.policy = policy
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._ctrl = (
            control_group if control_group is not None else dist.new_group(backend="gloo", timeout=timeout)
        )
        self._seeds = seed_group if seed_group is not None else dist.new_group(timeout=timeout)
        self._local_evaluate = policy.evaluate
        self._local_contribution = policy.contribution
        policy.evaluate = self.evaluate
        if policy.contribution is not None:  # a held-out split: judged on the mean over ranks too
            policy.contribution = self._mean_contribution
        policy.agreement = self
        self._tracked: dict[str, list[nn.Parameter]] = {}
        self.common_keys: dict[str, str] = {}  # kernels every rank holds, as of the last evaluation
        self.collectives = 0  # control collectives issued (a test's and a benchmark's counter)
        self.attach()

    def close(self) -> None:
        """Detach from the policy and let go of both process groups (collective; idempotent).

        Call it before `dist.destroy_process_group()`. The coordinator and its policy refer to each
        other, so without it the groups outlive `destroy_process_group()` until the interpreter's
        last garbage collection, and a gloo group torn down there can abort a process whose training
        succeeded ("terminate called without an active exception"). The barrier first: no rank lets
        go while a peer is still in a collective with it.
        """
        if self._ctrl is None:
            return
        dist.barrier(group=self._ctrl)
        self.policy.evaluate = self._local_evaluate
        self.policy.contribution = self._local_contribution
        self.policy.agreement = None
        self._ctrl = self._seeds = None
        self._tracked = {}

    def _mean_contribution(self) -> float:
        assert self._local_contribution is not None
        return self.mean(float(self._local_contribution()))

    def _group(self, group: Any) -> Any:
        """A group to issue a collective on; never None, which torch would read as the whole world."""
        if group is None:
            raise RuntimeError("this SeedCoordinator is closed")
        return group

    # ---- small collectives ---------------------------------------------------------------------

    def _all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self._group(self._ctrl))
        self.collectives += 1
        return out

    def _bcast(self, obj: Any = None) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group(self._ctrl))
        self.collectives += 1
        return box[0]

    def mean(self, local: float) -> float:
        """The mean of one float over the ranks, bit-identical on every rank (summed in rank order)."""
        t = torch.tensor([float(local)], dtype=torch.float64)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self._group(self._ctrl))
        self.collectives += 1
        return sum(float(x.item()) for x in out) / self.world

    def _broadcast_params(self, tensors: list[torch.Tensor]) -> None:
        if not tensors:
            return
        flat = _flat(tensors)
        dist.broadcast(flat, src=0, group=self._group(self._seeds))
        with torch.no_grad():
            i = 0
            for t in tensors:
                t.copy_(flat[i : i + t.numel()].view_as(t))
                i += t.numel()

    # ---- attach / checkpoints ------------------------------------------------------------------

    def attach(self) -> None:
        """Check that every rank's slots are in the same state, then make the seeds' parameters
        rank 0's and start averaging their gradients (at construction; again after a restore)."""
        mine = [(n, s.state.value, s.kernel_key) for n, s in self.policy.slots.items()]
        everyone = self._all_gather(mine)
        if any(o != everyone[0] for o in everyone):
            bad = [r for r, o in enumerate(everyone) if o != everyone[0]]
            raise RanksDiverged(f"slot states differ from rank 0's on rank(s) {bad}: {everyone[bad[0]]}")
        self._tracked = {}
        for slot in self.policy.slots.values():
            if slot.seed is not None and slot.state in KERNEL_STATES:
                self._track(slot)

    def _track(self, slot: SeedSlot) -> None:
        assert slot.seed is not None
        self._broadcast_params([*slot.seed.parameters(), *slot.seed.buffers()])
        self._tracked[slot.name] = list(slot.seed.parameters())

    def state_dict(self) -> dict[str, Any]:
        """The policy's state (identical on every rank): save it beside the model's state_dict."""
        return self.policy.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the policy, then `attach()` (collective)."""
        self.policy.load_state_dict(state)
        self.attach()

    # ---- evaluation: reduced inputs, rank 0 decides ----------------------------------------------

    def evaluate(self) -> float:
        """The policy's evaluate, averaged over ranks (what the policy calls when a blend ends)."""
        return self.mean(float(self._local_evaluate()))

    def local_kernels(self) -> dict[str, str]:
        """The kernels this rank can load: key -> manifest sha256 ('' where the catalog has none)."""
        return {e.key: e.sha256 or "" for e in self.policy.catalog.ranked()}

    def on_eval(self, local_val_loss: float, step: int | None = None) -> float:
        """Feed this rank's validation loss; returns the mean over ranks that the policy saw."""
        gathered = self._all_gather((float(local_val_loss), self.local_kernels()))
        val = sum(v for v, _ in gathered) / self.world
        first = gathered[0][1]
        self.common_keys = {k: h for k, h in first.items() if all(g[1].get(k) == h for g in gathered[1:])}
        if self.rank == 0:
            self._lead(val, step)
        else:
            self._follow()
        return val

    def _lead(self, val: float, step: int | None) -> None:
        policy = self.policy
        full, n_events = policy.catalog, len(policy.events)
        policy.catalog = KernelCatalog(
            e for e in full.ranked() if self.common_keys.get(e.key) == (e.sha256 or "")
        )
        try:
            policy.on_eval(val, step)
        except BaseException as e:
            self._bcast(("error", f"rank 0: {type(e).__name__}: {e}"))
            raise
        finally:
            policy.catalog = full
        state = policy.state_dict()
        state["events"] = policy.events[n_events:]
        self._bcast(("done", state))

    def _follow(self) -> None:
        while True:
            msg = self._bcast()
            if msg[0] == "germinate":
                _, name, key, sha, step = msg
                self._germinate_here(self.policy.slots[name], key, sha, step)
            elif msg[0] == "done":
                state = dict(msg[1])
                state["events"] = [*self.policy.events, *state["events"]]
                self.policy.load_state_dict(state)
                return
            else:
                raise RanksDiverged(str(msg[1]))

    def _germinate_here(self, slot: SeedSlot, key: str, sha: str, step: int) -> None:
        entry = next((e for e in self.policy.catalog.ranked() if e.key == key), None)
        ok = False
        if entry is None or (entry.sha256 or "") != sha:
            slot.telemetry.last_error = f"NotDelivered: kernel {key} is not in this rank's catalog"
        else:
            ok = slot.germinate(entry.source, key=key, expected_sha256=entry.sha256, step=step)
        if self._conclude(slot, ok):
            self.policy.start_seed(slot)

    # Agreement (called by the policy: germinate on rank 0 only, verdict on every rank) --------------

    def germinate(self, slot: SeedSlot, entry: CatalogEntry) -> bool:
        if self.rank != 0:
            raise RanksDiverged(f"rank {self.rank} tried to grow a seed on its own; only rank 0 decides")
        step = self.policy.step_count
        self._bcast(("germinate", slot.name, entry.key, entry.sha256 or "", step))
        ok = slot.germinate(entry.source, key=entry.key, expected_sha256=entry.sha256, step=step)
        return self._conclude(slot, ok)

    def _conclude(self, slot: SeedSlot, ok: bool) -> bool:
        """Keep a germination only if it succeeded on every rank; else roll it back everywhere, with
        the first refusing rank's reason recorded on every rank."""
        outcomes = self._all_gather(None if ok else (slot.telemetry.last_error or "refused"))
        if all(o is None for o in outcomes):
            self._track(slot)
            return True
        if ok:
            slot.cull("refused on another rank")
            slot.reset()
        r = next(r for r, o in enumerate(outcomes) if o is not None)
        slot.telemetry.last_error = f"refused on rank {r}: {outcomes[r]}"
        return False

    def verdict(self, slot: SeedSlot, keep: bool) -> bool:
        """Rank 0's keep/cull verdict for every rank; cull wherever the seed failed on some rank
        during the measuring evaluations (its slot culled it there on the spot)."""
        votes = self._all_gather((keep, slot.state is not S.CULLED))
        if all(alive for _, alive in votes):
            return bool(votes[0][0])
        failed = sum(not alive for _, alive in votes)
        self._tracked.pop(slot.name, None)
        slot.telemetry.last_error = f"SeedError on {failed} of {self.world} ranks"
        return False

    # ---- every step ------------------------------------------------------------------------------

    def sync_grads(self) -> None:
        """Average every seed's gradients over the ranks (after backward, before optimizer.step)."""
        if not self._tracked:
            return
        for name in [n for n in self._tracked if self.policy.slots[n].state is S.DORMANT]:
            del self._tracked[name]  # culled and reset by the policy on every rank
        if not self._tracked:
            return
        items = list(self._tracked.items())
        grads: list[torch.Tensor] = []
        flags: list[float] = []
        for name, params in items:
            flags.append(1.0 if self.policy.slots[name].state is S.CULLED else 0.0)
            for p in params:
                flags.append(0.0 if p.grad is None else 1.0)
                grads.append(torch.zeros_like(p) if p.grad is None else p.grad)
        flat = torch.cat([_flat(grads), torch.tensor(flags, dtype=grads[0].dtype)])
        dist.all_reduce(flat, group=self._group(self._seeds))
        n = sum(g.numel() for g in grads)
        summed, counts = flat[:n], flat[n:].tolist()
        summed /= self.world
        i = j = 0
        for name, params in items:
            failed = counts[j]
            j += 1
            for p in params:
                g = summed[i : i + p.numel()].view_as(p)
                i += p.numel()
                if counts[j] > 0:
                    if p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad.copy_(g)
                j += 1
            if failed > 0:
                self._cull_everywhere(self.policy.slots[name], int(failed))

    def _cull_everywhere(self, slot: SeedSlot, failed: int) -> None:
        reason = f"SeedError on {failed} of {self.world} ranks"
        if slot.state is not S.CULLED:
            slot.cull(reason)
        slot.telemetry.last_error = reason
        del self._tracked[slot.name]

    # ---- checks ----------------------------------------------------------------------------------

    def digests(self, model: nn.Module) -> list[str]:
        """sha256 of `model`'s parameters and buffers, from every rank (equal when in sync)."""
        return self._all_gather(state_digest(model))

    def assert_in_sync(self, model: nn.Module) -> str:
        """Raise RanksDiverged unless every rank's parameters and buffers are bit-identical."""
        ds = self.digests(model)
        if any(d != ds[0] for d in ds):
            raise RanksDiverged(f"parameter digests differ across ranks: {ds}")
        return ds[0]


def state_digest(model: nn.Module | Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a model's parameters and buffers."""
    items = (
        [*model.named_parameters(), *model.named_buffers()] if isinstance(model, nn.Module) else list(model)
    )
    h = hashlib.sha256()
    for name, t in sorted(items, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


__all__ = [
    "RanksDiverged",
    "SeedCoordinator",
    "ignore_seed_parameters",
    "seed_parameter_names",
    "state_digest",
]
