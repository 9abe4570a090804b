"""Tezzeret's cost and payoff, measured in one run.

(a) overhead: wall time of the compile Job (`python -m esper.tezzeret` into a temporary local store:
    checks, compile, validation, benchmark, manifest, upload) over a bare fresh-process compile of
    the same two programs (`compile_module`), each with its own cold TORCHINDUCTOR_CACHE_DIR.
    Target <= 1.25.
(b) payoff: compiled/eager latency per template (forward, and the training step fwd+bwd) at
    batches a seed sees in training, and their geometric means. Target >= 1.3x on CPU (forward);
    training step >= 1.2x per template, geomean >= 2.5x. The training step times the two packages
    called directly (the kernels' own cost); the trainer step times what a trainer runs: the same
    packages in the runtime's KernelModule, called through autograd (its guard, autograd.Function,
    gradient accumulation into .grad), against eager's forward + backward. Both compute the gradients
    of the input and the parameters. Beside it, the memory a training step keeps
    between forward and backward, in bytes per sample: the compiled kernel's saved tensors (exact,
    from the manifest's shapes) and eager autograd's (every distinct tensor autograd saves, measured
    with saved-tensor hooks at two batches; parameters cancel out). And the compile time of each
    template by part: export, partition, each AOTInductor compile, validation, benchmark.

Allocation: glibc returns freed blocks over 128 KiB to the OS and faults them in again on the next
step, so at batch 512 a step's time depends on the allocation history of the process (measured: the
conv block's eager step between 14 and 30 ms over runs of the same script). Like the compile Job,
the benchmark first sets glibc's mmap and trim thresholds to 1 GiB (`keep_freed_memory`: memory
kept and reused, as jemalloc or tcmalloc would), for both sides alike; `--malloc-defaults` measures
with glibc's defaults instead.

    python benchmarks/compile.py [--quick] [--target cpu-avx512] [--malloc-defaults]

Prints rich tables and writes benchmarks/results/compile.json (compile-<target>.json for a target other
than "cpu").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
OVERHEAD_SPEC = {"template": {"name": "residual-mlp", "params": {"features": 64, "hidden": 128, "blocks": 2}}}
TEMPLATES: dict[str, dict[str, Any]] = {
    "residual-mlp": {"features": 64, "hidden": 128, "blocks": 2},
    "lora-adapter": {"features": 64, "rank": 8},
    "transformer-mlp": {"features": 64, "hidden": 256},
    "attention-block": {"embed": 64, "heads": 4, "seq": 16},
    "bottleneck": {"features": 64, "bottleneck": 16},
    "conv-block": {"channels": 16, "height": 8, "width": 8},
}
QUICK = ("residual-mlp", "lora-adapter", "transformer-mlp")
BATCHES = [32, 128, 512]


def allocation(defaults: bool = False) -> dict[str, int] | str:
    """Keep freed memory for reuse unless `defaults` (see the module docstring); what the JSON records."""
    from esper.tezzeret.bench import KEEP_BYTES, keep_freed_memory

    kept = not defaults and keep_freed_memory()
    return {"mmapThreshold": KEEP_BYTES, "trimThreshold": KEEP_BYTES} if kept else "glibc defaults"


def _bare_compile(spec_json: str, out: str, target: str) -> None:
    """The baseline: build and compile the two programs, nothing else."""
    from esper.blueprint import validate_source
    from esper.contracts.common import CompileOptions
    from esper.tezzeret.compile import compile_graph

    spec = json.loads(spec_json)
    compile_graph(validate_source(spec), target, CompileOptions(), Path(out))


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=1200)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def overhead(target: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp:
        t = Path(tmp)
        spec = json.dumps(OVERHEAD_SPEC)
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(t / "cache-bare")}
        bare = _timed([sys.executable, __file__, "--bare", spec, str(t / "bare"), target], env)
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(t / "cache-job")}
        (t / "blueprint.json").write_text(spec)
        job = _timed(
            [sys.executable, "-m", "esper.tezzeret", "--target", target, "--store", str(t / "store"),
             "--blueprint", str(t / "blueprint.json"), "--result-path", str(t / "result.json")],
            env,
        )  # fmt: skip
        result = json.loads((t / "result.json").read_text())
    return {"bareSeconds": round(bare, 2), "jobSeconds": round(job, 2), "ratio": round(job / bare, 3),
            "jobReport": result.get("report")}  # fmt: skip


def eager_saved_bytes_per_sample(module: Any, input_specs: Any) -> float:
    """Bytes per sample that eager autograd keeps for the backward (distinct storages its saved-tensor
    hooks see, at batches 32 and 64: what does not grow with the batch, the parameters, cancels)."""
    import torch

    from esper.tezzeret.compile import sample_inputs

    def saved_bytes(batch: int) -> int:
        seen: dict[Any, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
            return t

        xs = [x.requires_grad_(True) for x in sample_inputs(input_specs, batch, torch.device("cpu"))]
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(*xs)
        del out
        return sum(seen.values())

    return (saved_bytes(64) - saved_bytes(32)) / 32


def _median_timings(runs: list[Any]) -> list[Any]:
    """Per batch, the median over repeated benchmark runs of each of the four latencies."""
    import statistics

    from esper.tezzeret.bench import BatchTiming

    out = []
    for per_batch in zip(*(r.timings for r in runs), strict=True):
        out.append(
            BatchTiming(
                per_batch[0].batch,
                *(statistics.median(getattr(t, f) for t in per_batch)
                  for f in ("eager_fwd", "compiled_fwd", "eager_train", "compiled_train")),
            )
        )  # fmt: skip
    return out


def trainer_step_micros(
    r: Any, options: Any, packages: Any, batch: int, budget_s: float
) -> tuple[float, float]:
    """Median µs of eager forward + backward and of the kernel as the runtime runs it (KernelModule
    through autograd), one thread, interleaved; both accumulate the input's and the parameters' grads."""
    import torch

    from esper.kasmina.kernel import KernelModule
    from esper.tezzeret.bench import interleaved_micros
    from esper.tezzeret.compile import sample_inputs

    kernel = KernelModule(
        packages.forward,
        packages.train_backward,
        [(s.name, t) for s, t in zip(r.param_specs, r.params, strict=True)],
        key="bench",
        n_inputs=len(r.input_specs),
        input_shapes=[["batch", *s.shape] for s in r.input_specs],
        output_shapes=[["batch", *shape] for shape in r.output_shapes],
        max_batch=options.maxBatch,
        train_forward_runner=packages.train_forward,
        saved=r.saved,
    )
    module = r.module
    xs = [
        x.requires_grad_(True) for x in sample_inputs(r.input_specs, batch, torch.device("cpu"), seed=batch)
    ]
    with torch.no_grad():
        outs = module(*xs)
    gs = [torch.ones_like(o) for o in (outs if isinstance(outs, (tuple, list)) else (outs,))]

    def step(m: Any, params: Any) -> None:
        for t in (*params, *xs):
            t.grad = None
        out = m(*xs)
        torch.autograd.backward(tuple(out) if isinstance(out, (tuple, list)) else (out,), gs)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eager, trainer = interleaved_micros(
            [
                lambda: step(module, list(module.parameters())),
                lambda: step(kernel, list(kernel.parameters())),
            ],
            budget_s,
        )
    finally:
        torch.set_num_threads(previous)
    return eager, trainer


def speedups(names: list[str], repeat: int = 1, target: str = "cpu") -> dict[str, Any]:
    from esper.blueprint import validate_source
    from esper.contracts.common import CompileOptions
    from esper.tezzeret.bench import BenchResult, benchmark, geomean
    from esper.tezzeret.compile import compile_graph
    from esper.tezzeret.validate import load_result_packages, validate

    rows: dict[str, Any] = {}
    options = CompileOptions(benchmarkBatches=BATCHES)
    compiled: list[Any] = []
    runs_by: dict[str, list[Any]] = {name: [] for name in names}
    trainer_by: dict[str, list[list[tuple[float, float]]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench-speedup-") as tmp:
        for name in names:
            graph = validate_source({"template": {"name": name, "params": TEMPLATES[name]}})
            t0 = time.perf_counter()
            r = compile_graph(graph, target, options, Path(tmp) / name)
            seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            packages = load_result_packages(r)
            validate(r, options, packages)
            validate_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            b = benchmark(r, options, packages, budget_s=3.0)
            bench_s = time.perf_counter() - t0
            runs_by[name].append(b)
            trainer_by[name].append([trainer_step_micros(r, options, packages, n, 0.5) for n in BATCHES])
            extra = {"validate": round(validate_s, 2), "benchmark": round(bench_s, 2)}
            compiled.append((name, r, packages, seconds, extra))
        for _ in range(repeat - 1):  # the same kernels again, later: a noisy neighbour hits other rounds
            for name, r, packages, _s, _extra in compiled:
                runs_by[name].append(benchmark(r, options, packages, budget_s=3.0))
                trainer_by[name].append([trainer_step_micros(r, options, packages, n, 0.5) for n in BATCHES])
        for name, r, _packages, seconds, extra in compiled:
            b = BenchResult(_median_timings(runs_by[name]))  # per batch, the median of the rounds
            trainer = [tuple(statistics.median(run[i][j] for run in trainer_by[name]) for j in (0, 1))
                       for i in range(len(BATCHES))]  # fmt: skip
            parts = {k: round(v, 2) for k, v in r.timings.items()}
            rows[name] = {
                "compileSeconds": round(seconds, 1),
                "compileParts": {**parts, **extra},
                "savedBytesPerSample": round(r.saved_bytes_per_sample, 1),
                "eagerSavedBytesPerSample": round(eager_saved_bytes_per_sample(r.module, r.input_specs), 1),
                "speedup": round(b.speedup, 3),
                "trainSpeedup": round(b.train_speedup, 3),
                "trainerSpeedup": round(geomean([e / k for e, k in trainer]), 3),
                "trainerBatches": [{"batch": n, "eagerStep": round(e, 1), "kernelStep": round(k, 1)}
                                   for n, (e, k) in zip(BATCHES, trainer, strict=True)],
                "batches": [
                    {"batch": t.batch, "eagerFwd": round(t.eager_fwd, 1),
                     "compiledFwd": round(t.compiled_fwd, 1), "eagerTrain": round(t.eager_train, 1),
                     "compiledTrain": round(t.compiled_train, 1)}
                    for t in b.timings
                ],
            }  # fmt: skip
    return {
        "templates": rows,
        "geomeanSpeedup": round(geomean([r["speedup"] for r in rows.values()]), 3),
        "geomeanTrainSpeedup": round(geomean([r["trainSpeedup"] for r in rows.values()]), 3),
        "geomeanTrainerSpeedup": round(geomean([r["trainerSpeedup"] for r in rows.values()]), 3),
    }


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--repeat", type=int, default=3, help="benchmark rounds per kernel (median taken)")
    ap.add_argument(
        "--target", default="cpu", choices=("cpu", "cpu-avx512"), help="the CPU target compiled for"
    )
    ap.add_argument("--malloc-defaults", action="store_true", help="keep glibc's allocation thresholds")
    args = ap.parse_args()
    malloc = allocation(args.malloc_defaults)
    names = list(QUICK if args.quick else TEMPLATES)
    console = Console(width=200)
    load_before = os.getloadavg()
    over = overhead(args.target)
    table = Table(title="(a) compile Job vs bare compile, fresh process, cold inductor cache each")
    for c in ("bare compile s", "compile Job s", "ratio (target <= 1.25)"):
        table.add_column(c)
    table.add_row(str(over["bareSeconds"]), str(over["jobSeconds"]), str(over["ratio"]))
    console.print(table)
    sp = speedups(names, repeat=args.repeat, target=args.target)
    title = f"(b) compiled for {args.target} vs eager, CPU, batches {BATCHES} (median µs; speedup = geomean)"
    table = Table(title=title)
    for c in ("template", "fwd speedup", "train speedup", "trainer step", "saved B/sample (eager)",
              *[f"fwd/train µs @{b}" for b in BATCHES]):  # fmt: skip
        table.add_column(c)
    for name, r in sp["templates"].items():
        cells = [f"{t['eagerFwd']:.0f}/{t['compiledFwd']:.0f}  {t['eagerTrain']:.0f}/{t['compiledTrain']:.0f}"
                 for t in r["batches"]]  # fmt: skip
        mem = f"{r['savedBytesPerSample']:.0f} ({r['eagerSavedBytesPerSample']:.0f})"
        trainer = f"{r['trainerSpeedup']:.2f}x"
        table.add_row(name, f"{r['speedup']:.2f}x", f"{r['trainSpeedup']:.2f}x", trainer, mem, *cells)
    table.add_row("geomean", f"{sp['geomeanSpeedup']:.2f}x", f"{sp['geomeanTrainSpeedup']:.2f}x",
                  f"{sp['geomeanTrainerSpeedup']:.2f}x")  # fmt: skip
    console.print(table)
    table = Table(title="(c) compile time per template, seconds by part")
    columns = {
        "export (3)": ("exportForward", "exportTrainForward", "exportTrainBackward"),
        "partition": ("partition",),
        "AOTI forward": ("aotiForward",),
        "AOTI train fwd": ("aotiTrainForward",),
        "AOTI train bwd": ("aotiTrainBackward",),
        "validate": ("validate",),
        "benchmark": ("benchmark",),
    }
    for c in ("template", *columns, "compile total"):
        table.add_column(c)
    for name, r in sp["templates"].items():
        parts = r["compileParts"]
        cells = [f"{sum(parts.get(k, 0) for k in keys):.1f}" for keys in columns.values()]
        table.add_row(name, *cells, f"{r['compileSeconds']:.1f}")
    console.print(table)
    import torch

    load = {"before": load_before, "after": os.getloadavg()}
    doc = {"torch": torch.__version__, "cpus": os.cpu_count(), "benchThreads": 1, "repeat": args.repeat,
           "target": args.target, "malloc": malloc, "loadAverage": load, "overhead": over, **sp}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("compile.json" if args.target == "cpu" else f"compile-{args.target}.json")
    out.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--bare":
        _bare_compile(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
