"""`esper kasmina train`: the example trainer of a training pod.

It trains the demo's under-sized host on the demo's synthetic task and grows it with whatever Kernels
the Kasmina sidecar delivers: between steps it stats the sidecar's index (one `os.stat`), adds newly
arrived bundles to the policy's catalog (verified against the sha256 the index recorded when a seed
loads them), and lets the plateau policy germinate, train, blend and fossilize or cull. Seed events
are printed as JSON lines; seed metrics are served for Prometheus.

Under torchrun (`WORLD_SIZE` > 1, e.g. `torchrun --no-python esper kasmina train` in each pod of a
PyTorchJob or TrainJob) it trains data-parallel: the host in DistributedDataParallel (gloo), every
rank on its own batches, seeds grown only by agreement of every rank (`SeedCoordinator`: a kernel one
pod's sidecar has not delivered yet is not grown anywhere). Rank 0 prints the events; a SIGTERM on
any rank stops every rank at the next evaluation.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("esper.demo.trainer")


@dataclass(frozen=True)
class TrainerOptions:
    kernel_dir: Path
    steps: int = 0  # 0: until SIGTERM
    slots: int = 4
    metrics_port: int = 9091
    seed: int = 0


def _emit(event: dict[str, Any]) -> None:
    print(json.dumps(event, default=str), flush=True)


def train(options: TrainerOptions) -> int:
    import torch
    from prometheus_client import start_http_server

    from esper.demo import DemoConfig, build_host, make_task
    from esper.kasmina import KernelCatalog, default_metrics, warmup, wrap
    from esper.sidecar.index import IndexCorrupt, IndexWatcher

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cfg = DemoConfig(seed=options.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank = dist.get_rank()
    say = _emit if rank == 0 else (lambda _event: None)
    say({"event": "start", "warmupSeconds": round(warmup(), 3), "kernelDir": str(options.kernel_dir),
         "world": world})  # fmt: skip
    if options.metrics_port:
        start_http_server(options.metrics_port + int(os.environ.get("LOCAL_RANK", "0")))
    task = make_task(cfg)
    model = build_host(cfg, options.slots)
    wrap(
        model,
        [f"blocks.{i}" for i in range(options.slots)],
        blend_steps=cfg.blend_steps,
        metrics=default_metrics(),
    )
    forward: torch.nn.Module = model
    if world > 1:
        from esper.kasmina.distributed import ignore_seed_parameters

        ignore_seed_parameters(model)
        forward = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.MSELoss()

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            loss = loss_fn(model(task.x_val[: cfg.eval_batch]), task.y_val[: cfg.eval_batch]).item()
        model.train()
        return loss

    catalog = KernelCatalog()
    policy = cfg.policy(catalog, evaluate, model, optimizer)
    coord = None
    if world > 1:
        from esper.kasmina.distributed import SeedCoordinator

        coord = SeedCoordinator(policy)
    watcher = IndexWatcher(options.kernel_dir)
    known: set[str] = set()
    seen_events = 0
    generator = torch.Generator().manual_seed(cfg.seed + rank)  # each rank its own batches
    step = 0
    stopping = False
    while not stopping and (options.steps == 0 or step < options.steps):
        try:
            index = watcher.changed()
        except IndexCorrupt as exc:  # the sidecar rewrites it atomically; a corrupt file is someone else's
            log.warning("%s", exc)
            index = None
        if index is not None:
            for entry in index.kernels:
                if entry.key in known:
                    continue
                found = KernelCatalog.from_bundles([entry.bundle_dir(options.kernel_dir)]).ranked()
                for e in found:
                    catalog.add(e.key, e.source, e.score, e.sample_shape, sha256=entry.sha256)
                    known.add(e.key)
                    say({"event": "kernel-arrived", "step": step, "kernel": entry.name, "key": e.key})
        idx = torch.randint(0, task.x_train.shape[0], (cfg.batch,), generator=generator)
        loss = loss_fn(forward(task.x_train[idx]), task.y_train[idx])
        loss.backward()
        if coord is not None:
            coord.sync_grads()
        optimizer.step()
        policy.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.eval_every == 0:
            if coord is not None:
                val = coord.on_eval(evaluate(), step)
                stopping = coord.mean(1.0 if stop.is_set() else 0.0) > 0  # every rank stops together
            else:
                val = evaluate()
                policy.on_eval(val, step)
            say({"event": "eval", "step": step, "valLoss": round(val, 5), "time": time.time()})
        stopping = stopping or (coord is None and stop.is_set())
        for ev in policy.events[seen_events:]:
            say(ev)
        seen_events = len(policy.events)
    final = coord.evaluate() if coord is not None else evaluate()
    say({"event": "stop", "step": step, "valLoss": round(final, 5)})
    if coord is not None:
        import torch.distributed as dist

        coord.close()  # lets go of its process groups: one torn down at interpreter exit can abort
        del forward  # before the process group: a DDP that outlives it aborts the process
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="esper kasmina train", description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-dir", default=os.environ.get("ESPER_KERNEL_DIR", ""))
    parser.add_argument("--steps", type=int, default=0, help="0: train until SIGTERM")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--metrics-port", type=int, default=9091)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.kernel_dir:
        print("esper kasmina train: set ESPER_KERNEL_DIR or --kernel-dir", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return train(TrainerOptions(Path(args.kernel_dir), args.steps, args.slots, args.metrics_port, args.seed))
