"""The demo's grown run on several data-parallel workers: `esper demo --workers N`.

`grow_workers` launches `torchrun --nproc-per-node N` (gloo, CPU) on this module. Every rank builds the
same host, wraps its slots, wraps the host in `DistributedDataParallel` and grows it with a
`SeedCoordinator` over the same compiled bundles as the single-process grown run. The global batch
and the batch order are the single-process run's; each rank trains on its equal share of every batch
and evaluates its share of the validation set, so the run differs from the single-process one only
in the order of the gradient sums. After every optimizer step the ranks compare a sha256 of their
parameters (all_gather) and stop if they differ. Rank 0 writes the run's numbers as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

from esper.demo.config import DemoConfig, DemoError, KernelInfo, RunResult

TIMEOUT_S = 60  # process-group timeout: a rank stuck this long fails the run instead of hanging it


def grow_workers(
    cfg: DemoConfig, kernels: Sequence[KernelInfo], workers: int, workdir: Path, timeout: float = 1800
) -> tuple[RunResult, list[dict[str, Any]], dict[str, Any]]:
    """Run the grown run on `workers` ranks; (result, seed events, extra figures)."""
    if workers < 2:
        raise ValueError("workers must be >= 2 (one worker is the single-process grown run)")
    if cfg.batch % workers or cfg.n_val % workers:
        raise DemoError(f"--workers {workers} must divide the batch ({cfg.batch}) and n_val ({cfg.n_val})")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / f"workers{workers}-spec.json"
    out = workdir / f"workers{workers}.json"
    out.unlink(missing_ok=True)
    spec.write_text(json.dumps({"config": asdict(cfg), "kernels": [k.to_json() for k in kernels]}))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
           "--max-restarts=0", "-m", "esper.demo.distributed", str(spec), str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        msg = f"the {workers}-worker run did not finish in {timeout:.0f}s:\n{log[-2000:]}"
        raise DemoError(msg) from None
    if proc.returncode != 0 or not out.exists():
        raise DemoError(f"the {workers}-worker run failed (exit {proc.returncode}):\n{log[-3000:]}")
    data = json.loads(out.read_text())
    run = data["run"]
    result = RunResult(
        name=f"grown x{workers}",
        params=run["params"],
        train_loss=run["trainLoss"],
        val_loss=run["valLoss"],
        best_val_loss=run["bestValLoss"],
        wall_seconds=run["wallSeconds"],
        steps=run["steps"],
        curve=[(int(s), float(v)) for s, v in run["curve"]],
        params_start=run["paramsStart"],
        note=run["note"],
    )
    return result, data["events"], data["figures"]


def _worker(spec_path: Path, out_path: Path) -> int:
    """One rank of the grown run (under torchrun)."""
    import torch
    import torch.distributed as dist
    from prometheus_client import CollectorRegistry
    from torch.nn.parallel import DistributedDataParallel

    from esper.demo.train import _evaluate, _n_params, build_host, make_task, record_events
    from esper.kasmina import CatalogEntry, KasminaMetrics, KernelCatalog, warmup, wrap
    from esper.kasmina.distributed import SeedCoordinator, ignore_seed_parameters

    spec = json.loads(spec_path.read_text())
    c = dict(spec["config"])
    c["examples"] = tuple(c["examples"])
    cfg = DemoConfig(**c)
    kernels = [k for k in spec["kernels"] if k.get("key") and k.get("bundle")]
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(cfg.threads)
    warmup()
    task = make_task(cfg)
    names = {k["key"]: k["blueprint"] for k in kernels}
    entries = [
        CatalogEntry(k["key"], Path(k["bundle"]), score=float(len(kernels) - i), sha256=k["manifestSha256"])
        for i, k in enumerate(kernels)
    ]
    model = build_host(cfg, len(kernels))
    wrap(model, [f"blocks.{i}" for i in range(len(kernels))], blend_steps=cfg.blend_steps,
         metrics=KasminaMetrics(CollectorRegistry()))  # fmt: skip
    params_start = _n_params(model)
    ignore_seed_parameters(model)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    b, n = cfg.batch // world, cfg.n_val // world
    x_val, y_val = task.x_val[rank * n : (rank + 1) * n], task.y_val[rank * n : (rank + 1) * n]

    def local_eval() -> float:
        return _evaluate(model, x_val, y_val, cfg.eval_batch)

    policy = cfg.policy(KernelCatalog(entries), local_eval, model, opt)
    coord = SeedCoordinator(policy, timeout=timedelta(seconds=TIMEOUT_S))
    used: set[str] = set()
    seen = 0
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    curve = [(0, coord.evaluate())]
    sync_s = check_s = 0.0
    model.train()
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, len(task.x_train), (cfg.batch,), generator=gen)[rank * b : (rank + 1) * b]
        loss = torch.nn.functional.mse_loss(ddp(task.x_train[idx]), task.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t = time.perf_counter()
        coord.sync_grads()
        sync_s += time.perf_counter() - t
        opt.step()
        policy.step()
        t = time.perf_counter()
        coord.assert_in_sync(model)  # every step: bit-identical parameters on every rank
        check_s += time.perf_counter() - t
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve.append((step, coord.on_eval(local_eval(), step)))
        seen = record_events(policy, seen, names, entries, used)  # as the single-process grown run
    wall = time.perf_counter() - t0
    n_fit = min(len(task.x_train), cfg.n_val) // world
    lo = rank * n_fit
    train_loss = coord.mean(
        _evaluate(model, task.x_train[lo : lo + n_fit], task.y_train[lo : lo + n_fit], cfg.eval_batch)
    )
    digest = coord.assert_in_sync(model)
    if rank == 0:
        states = ", ".join(f"{s.name}: {s.state.value}" for s in policy.slots.values())
        run = {"params": _n_params(model), "paramsStart": params_start, "trainLoss": train_loss,
               "valLoss": curve[-1][1], "bestValLoss": min(v for _, v in curve), "wallSeconds": wall,
               "steps": cfg.steps, "curve": curve, "note": f"{world} ranks (gloo); {states}"}  # fmt: skip
        figures = {"workers": world, "inSyncChecks": cfg.steps + 1, "digest": digest,
                   "seedGradSyncSeconds": sync_s, "digestCheckSeconds": check_s,
                   "controlCollectives": coord.collectives}  # fmt: skip
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run": run, "events": policy.events, "figures": figures}, default=str))
        tmp.replace(out_path)
    coord.close()  # a barrier, then lets go of its process groups (one torn down at exit can abort)
    del ddp  # before the process group: a DDP that outlives it aborts the process at exit
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker(Path(sys.argv[1]), Path(sys.argv[2])))
