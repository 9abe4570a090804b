"""A small data-parallel growth run, one rank per process (`torchrun -m tests.support.ddp_worker`).

The same function runs in one process without torch.distributed (`grow_run(world=1)`), which is the
single-process reference the tests compare the 2-rank run with: the global batch is the same, each
rank takes an equal share of it, so the runs differ only in the summation order of the gradients.

Scenarios (`--scenario`), each writing `<out>/rank<r>.json` (events, per-step digests, losses):

- `grow`: two eager kernels whose factories initialise differently on each rank (the coordinator's
  broadcast must make them equal); every rank has both from the start.
- `late`: rank 1's sidecar delivers the kernels only at `--late-step`.
- `refuse`: the first-ranked kernel fails to load on rank 1 only.
- `fail`: the seed raises in its forward on rank 1 only, `--fail-after` steps after it germinates.
- `fail-eval`: the seed raises on rank 1 only in its evaluation forward number `--fail-after` + 1.
- `checkpoint`: like `grow`, then rank 0 saves a checkpoint at the end (`<out>/ckpt.pt`).
- `restore`: restores `--ckpt` (on whatever number of ranks) and trains `--steps` more.
- `bundle`: one compiled kernel bundle (`--bundle`, `--sha256`) instead of the eager kernels.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

D_IN, WIDTH, D_OUT, N_SLOTS = 8, 16, 2, 2
BATCH, N_TRAIN, N_VAL = 64, 2048, 512


class ResidualMLP(nn.Module):
    """A residual seed; with `fail_on_rank` it raises on that rank after `fail_after` training
    forwards (or, with `in_eval`, after that many evaluation forwards)."""

    def __init__(self, fail_on_rank: int | None = None, fail_after: int = 0, in_eval: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(WIDTH, 32), nn.Linear(32, WIDTH)
        self.fail_on_rank, self.fail_after, self.in_eval, self.calls = fail_on_rank, fail_after, in_eval, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.training and torch.is_grad_enabled()) != self.in_eval:
            self.calls += 1
            if self.fail_on_rank == _rank() and self.calls > self.fail_after:
                raise RuntimeError("seed failed on this rank")
        return x + self.fc2(torch.tanh(self.fc1(x)))


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def task() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    teacher = nn.Sequential(
        nn.Linear(D_IN, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, D_OUT)
    )
    with torch.no_grad():
        for m in teacher:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 2.0 / m.in_features**0.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
        x = torch.randn(N_TRAIN + N_VAL, D_IN, generator=gen)
        y = teacher(x)
        y = (y - y.mean(0)) / y.std(0)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def host() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(D_IN, WIDTH), nn.GELU(), *[nn.Identity() for _ in range(N_SLOTS)], nn.Linear(WIDTH, D_OUT)
    )


SLOT_NAMES = [str(2 + i) for i in range(N_SLOTS)]


def kernel_factory(key: str, **kw: Any) -> Any:
    from esper.kasmina import EagerKernel

    def make() -> nn.Module:
        # A different initialisation on each rank: only the coordinator's broadcast makes them agree.
        torch.manual_seed(1000 + 17 * _rank() + len(key))
        return EagerKernel(ResidualMLP(**kw), key)

    return make


def catalog_entries(scenario: str, args: argparse.Namespace) -> list[Any]:
    from esper.kasmina import CatalogEntry

    if scenario == "bundle":
        from esper.artifact import read_manifest

        key = read_manifest(args.bundle).key
        return [CatalogEntry(key, Path(args.bundle), 1.0, sample_shape=(WIDTH,), sha256=args.sha256)]
    kw: dict[str, Any] = {}
    if scenario in ("fail", "fail-eval"):
        kw = {"fail_on_rank": 1, "fail_after": args.fail_after, "in_eval": scenario == "fail-eval"}
    entries = [
        CatalogEntry("mlp-a", kernel_factory("mlp-a", **kw), 2.0),
        CatalogEntry("mlp-bb", kernel_factory("mlp-bb"), 1.0),
    ]
    if scenario == "refuse" and _rank() == 1:

        def broken() -> nn.Module:
            raise OSError("bundle unreadable on this node")

        entries[0] = CatalogEntry("mlp-a", broken, 2.0)
    return entries


def grow_run(args: argparse.Namespace, world: int = 1) -> dict[str, Any]:
    """Train the small host with seeds; with world > 1 under torchrun, data-parallel with a coordinator."""
    import torch.distributed as dist

    from esper.kasmina import KasminaMetrics, KernelCatalog, PlateauPolicy, set_kernel_resolver, wrap
    from esper.kasmina.distributed import (
        SeedCoordinator,
        ignore_seed_parameters,
        seed_parameter_names,
        state_digest,
    )

    torch.set_num_threads(1)
    rank = dist.get_rank() if world > 1 or dist.is_initialized() else 0
    x, y, xv, yv = task()
    model = host()
    from prometheus_client import CollectorRegistry

    wrap(model, SLOT_NAMES, blend_steps=args.blend, metrics=KasminaMetrics(CollectorRegistry()))
    entries = catalog_entries(args.scenario, args)
    delayed = args.scenario == "late" and rank == 1
    catalog = KernelCatalog([] if delayed else entries)

    def local_eval() -> float:
        model.eval()
        with torch.no_grad():
            lo, n = rank * (N_VAL // world), N_VAL // world
            # chunks of 64: within a compiled kernel's maxBatch
            v = sum(float(nn.functional.mse_loss(model(xv[i : i + 64]), yv[i : i + 64], reduction="sum"))
                    for i in range(lo, lo + n, 64)) / (n * D_OUT)  # fmt: skip
        model.train()
        return v

    policy = PlateauPolicy(
        patience=2, min_delta=args.min_delta, train_steps=args.train, blend_steps=args.blend,
        cull_threshold=args.cull_threshold, catalog=catalog, evaluate=local_eval, model=model,
        group_options={"lr": 3e-3},
    )  # fmt: skip
    opt_model = model
    state: dict[str, Any] | None = None
    if args.scenario == "restore":
        state = torch.load(args.ckpt, weights_only=False)
        by_key = {e.key: e.source for e in entries}
        set_kernel_resolver(model, lambda key: by_key[key]())
        model.load_state_dict(state["model"])
    if dist.is_initialized():
        ignore_seed_parameters(model)
        opt_model = nn.parallel.DistributedDataParallel(model)
    seed_names = set(seed_parameter_names(model))
    host_params = [p for n, p in model.named_parameters() if n not in seed_names]
    optimizer = torch.optim.Adam(host_params, lr=3e-3)
    policy.optimizer = optimizer
    coord = None
    if state is not None:
        policy.load_state_dict(state["policy"])
        for s in policy.slots.values():  # every seed had its own group, in germination (= slot) order
            if s.seed is not None:
                optimizer.add_param_group(s.param_group(**policy.group_options))
        optimizer.load_state_dict(state["optimizer"])
    if dist.is_initialized():
        coord = SeedCoordinator(policy, timeout=timedelta(seconds=60))
    restored_digest = state_digest(model) if state is not None else None

    gen = torch.Generator().manual_seed(11)
    digests, losses, in_sync = [], [], 0
    start = policy.step_count
    for step in range(start + 1, start + args.steps + 1):
        if delayed and step == args.late_step:
            for e in entries:
                catalog.add(e.key, e.source, e.score, e.sample_shape, e.sha256)
        idx = torch.randint(0, N_TRAIN, (BATCH,), generator=gen)
        part = idx[rank * (BATCH // world) : (rank + 1) * (BATCH // world)]
        loss = nn.functional.mse_loss(opt_model(x[part]), y[part])
        loss.backward()
        if coord is not None:
            coord.sync_grads()
        optimizer.step()
        policy.step()
        optimizer.zero_grad(set_to_none=True)
        if coord is not None:
            coord.assert_in_sync(model)  # raises unless every rank is bit-identical
            in_sync += 1
        digests.append(state_digest(model))
        if step % args.eval_every == 0:
            v = local_eval()
            val = coord.on_eval(v, step) if coord is not None else (policy.on_eval(v, step) or v)
            losses.append((step, val))
    final = coord.evaluate() if coord is not None else local_eval()
    out = {
        "rank": rank,
        "world": world,
        "events": policy.events,
        "digests": digests,
        "inSyncChecks": in_sync,
        "losses": losses,
        "finalVal": final,
        "states": {n: s.state.value for n, s in policy.slots.items()},
        "keys": {n: s.kernel_key for n, s in policy.slots.items()},
        "restoredDigest": restored_digest,
        "seedParams": {
            n: [p.detach().sum().item() for p in s.seed_parameters()] for n, s in policy.slots.items()
        },
    }
    if args.scenario == "checkpoint" and rank == 0:
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "policy": policy.state_dict(),
             "digest": state_digest(model)},
            Path(args.out) / "ckpt.pt",
        )  # fmt: skip
    if coord is not None:
        coord.close()  # lets go of its process groups before they are destroyed
    if opt_model is not model:
        del opt_model  # before the process group goes: a DDP outliving it aborts the process
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", default="grow")
    p.add_argument("--out", default=".")
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--train", type=int, default=20)
    p.add_argument("--blend", type=int, default=20)
    p.add_argument("--min-delta", type=float, default=10.0)  # every evaluation is a plateau: grow often
    p.add_argument("--cull-threshold", type=float, default=-0.1)  # keep most seeds: fossils train too
    p.add_argument("--late-step", type=int, default=100)
    p.add_argument("--fail-after", type=int, default=5)
    p.add_argument("--ckpt", default="")
    p.add_argument("--bundle", default="")
    p.add_argument("--sha256", default="")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    args = parse(argv)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        out = grow_run(args, dist.get_world_size())
        Path(args.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
