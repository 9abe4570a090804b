"""The demo, end to end."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


from esper.demo.compile import compile_kernels, kernel_table
from esper.demo.config import EXAMPLES_DIR, RUNS, DemoConfig, DemoError, DemoResult, RunResult
from esper.demo.report import events_table, plot, results_table
from esper.demo.train import build_host, build_large, grow, make_task, train

# ---------------------------------------------------------------- the demo


def _event_keys(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["step"], e["event"], e.get("slot"), e.get("kernel")) for e in events]


def run_demo(
    workdir: Path,
    *,
    quick: bool = False,
    console: Console | None = None,
    docs_png: Path | None = None,
    config: DemoConfig | None = None,
    examples_dir: Path = EXAMPLES_DIR,
    store: Path | None = None,
    workers: int = 1,
) -> DemoResult:
    """Compile the examples, train host / grown / large, print tables, write the PNG and the JSON.

    `store`: the kernel store directory (default `<workdir>/store`; e.g. the CLI's .esper/store).
    `docs_png`: also copy the PNG there (e.g. docs/demo-loss.png). `config` overrides the defaults
    (`quick` picks DemoConfig.quick()). `workers` > 1 also runs the grown run data-parallel on that
    many torchrun ranks (gloo, CPU; `esper.demo.distributed`). Raises DemoError if no kernel could be
    compiled.
    """
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from esper.kasmina import warmup

    console = console or Console()
    cfg = config or (DemoConfig.quick() if quick else DemoConfig())
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    console.rule("[bold]1. Compile the width-64 example Blueprints")
    kernels = compile_kernels(cfg.examples, workdir, console, examples_dir, store)
    compile_seconds = time.perf_counter() - t_start
    console.print(kernel_table(kernels))
    usable = [k for k in kernels if k.bundle and not k.error]
    if not usable:
        raise DemoError("no kernel compiled: " + "; ".join(f"{k.blueprint}: {k.error}" for k in kernels))

    console.rule("[bold]2. Train: host alone, grown with seeds, large from scratch")
    warmup_seconds = warmup()  # the one-off inductor import and ISA probe, paid before training
    console.print(f"kernel runtime warm-up: {warmup_seconds:.2f}s (once per process, before training)")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    # "Device information mismatch for AOTI_CPU_ISA: AVX512 vs AVX2" on every load: a cpu-avx2 kernel
    # on an AVX-512 machine is the contract (Target "cpu" = x86-64-v3), not a problem worth a warning.
    aoti_log = logging.getLogger("torch.export.pt2_archive._package")
    aoti_level = aoti_log.level
    aoti_log.setLevel(logging.ERROR)
    distributed: dict[str, Any] | None = None
    try:
        task = make_task(cfg)
        runs: dict[str, RunResult] = {}
        columns = (
            TextColumn("[bold]{task.fields[run]:<6}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            tids = {n: progress.add_task("", total=cfg.steps, run=n) for n in RUNS}
            runs["host"] = train("host", build_host(cfg, len(usable)), task, cfg, progress, tids["host"])
            runs["grown"], events = grow(cfg, usable, task, progress, tids["grown"])
            runs["large"] = train("large", build_large(cfg, usable), task, cfg, progress, tids["large"])
        if workers > 1:
            from esper.demo.distributed import grow_workers

            console.print(f"grown run on {workers} data-parallel workers (torchrun, gloo) ...")
            name = f"grown x{workers}"
            runs[name], w_events, distributed = grow_workers(cfg, usable, workers, workdir)
            distributed["sameEvents"] = _event_keys(w_events) == _event_keys(events)
            distributed["events"] = w_events
    finally:
        torch.set_num_threads(threads)
        aoti_log.setLevel(aoti_level)
    runs["host"].note = "blocks are identities (the seed slots, all dormant)"
    runs["large"].note = "every kernel's graph in eager in its block from step 0, g(y) (as a fossil)"

    console.rule("[bold]3. Results")
    console.print(results_table(runs))
    console.print(events_table(events))
    h, g, lg = runs["host"], runs["grown"], runs["large"]
    console.print(
        f"grown vs host: val {g.val_loss:.4f} vs {h.val_loss:.4f} "
        f"({(1 - g.val_loss / h.val_loss) * 100:.1f}% lower); "
        f"large from scratch: {lg.val_loss:.4f}. Timings are wall clock on a shared machine: noisy."
    )
    if distributed is not None:
        w = runs[f"grown x{workers}"]
        console.print(
            f"grown on {workers} workers: val {w.val_loss:.4f} vs {g.val_loss:.4f} in one process "
            f"({(w.val_loss / g.val_loss - 1) * 100:+.2f}%); seed events "
            + ("identical" if distributed["sameEvents"] else "DIFFERENT")
            + f" (step, slot, kernel); parameters bit-identical across ranks after all "
            f"{distributed['inSyncChecks']} checks"
        )
    png = plot(runs, events, workdir / "demo-loss.png")
    if png is not None and docs_png is not None:
        docs_png.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, docs_png)
    json_path = workdir / "demo.json"
    result = DemoResult(
        workdir=workdir,
        kernels=kernels,
        runs=runs,
        events=events,
        config=cfg,
        warmup_seconds=warmup_seconds,
        compile_seconds=compile_seconds,
        total_seconds=time.perf_counter() - t_start,
        png=png,
        json_path=json_path,
        distributed=distributed,
    )
    json_path.write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    console.print(
        f"wrote {json_path}"
        + (f" and {png}" if png else " (no PNG: matplotlib is not installed)")
        + (f"; copied to {docs_png}" if png and docs_png else "")
    )
    return result
