"""Latency of eager vs compiled, forward and training step, recorded in the Kernel's report.

Bounded in time (about `budget_s` per kernel, plus warmups): eager and compiled are timed in
interleaved blocks, and the median call is kept (robust to a noisy neighbour on a shared node).
Forward is timed under `torch.inference_mode` on both sides (a serving-style call); the training
step is eager forward + autograd backward against the training forward package + the training
backward package on the activations it saved; both compute the gradients of the inputs and the
parameters (a seed's input is an activation of its host, whose earlier layers need that gradient).
"""

from __future__ import annotations

import ctypes
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from esper.contracts.common import CompileOptions, ValidationReport

if TYPE_CHECKING:
    import torch

    from esper.tezzeret.compile import CompileResult
    from esper.tezzeret.validate import Packages, ValidationResult

WARMUP = 3
ROUNDS = 5
MIN_CALLS = 1
MAX_CALLS = 1000
# glibc's mallopt parameters (malloc.h), and the value `keep_freed_memory` sets both thresholds to
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30


def is_glibc() -> bool:
    """Whether this process runs on glibc (whose allocator `keep_freed_memory` tunes)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # a name this system's confstr does not know: not glibc
        return False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (mmap and trim thresholds at 1 GiB); False elsewhere.

    With glibc's defaults a freed block over 128 KiB goes back to the OS and the next step faults it
    in again, page by page, so a step's time at a large batch depends on the allocation history of
    the process (the conv block's eager step at batch 512 measured anywhere between 14 and 30 ms in
    runs of the same script). A training process reaches a steady state where its blocks are reused,
    as jemalloc or tcmalloc would reuse them; the benchmark measures that state, for both sides.
    Process-wide and not undone: for short-lived processes that benchmark (the compile Job, also when
    `esper compile` runs it in-process), never a trainer's, whose allocator is its owner's to choose.
    """
    if not is_glibc():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))


@dataclass
class BatchTiming:
    """Median microseconds at one batch size."""

    batch: int
    eager_fwd: float
    compiled_fwd: float
    eager_train: float
    compiled_train: float


@dataclass
class BenchResult:
    timings: list[BatchTiming] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return geomean([t.eager_fwd / t.compiled_fwd for t in self.timings])

    @property
    def train_speedup(self) -> float:
        return geomean([t.eager_train / t.compiled_train for t in self.timings])


def geomean(values: Sequence[float]) -> float:
    """Geometric mean of positive values (0 for none): the right mean for ratios."""
    vals = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else 0.0


def interleaved_micros(
    fns: Sequence[Callable[[], Any]], budget_s: float, sync: Callable[[], None] = lambda: None
) -> list[float]:
    """Median µs per call of each fn, timed call by call in ROUNDS interleaved blocks within ~`budget_s`.

    Interleaving (a block of fn 1, of fn 2, ..., repeated) spreads a noisy neighbour's load over all
    the fns instead of biasing whichever ran during it; each block starts with untimed warmup calls
    because the first calls after switching between eager ATen and a package stall on OpenMP thread
    wake-ups (milliseconds on a busy node); the median of single calls ignores the remaining spikes.
    """
    per_call: list[float] = []
    for fn in fns:
        for _ in range(WARMUP):
            fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        per_call.append(max(time.perf_counter() - t0, 1e-7))
    slot = budget_s / (ROUNDS * len(fns))
    calls = [int(min(MAX_CALLS, max(MIN_CALLS, slot / est))) for est in per_call]
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(ROUNDS):
        for i, fn in enumerate(fns):
            for _ in range(WARMUP):  # switching between eager and a package stalls the first calls
                fn()
            sync()
            deadline = time.perf_counter() + 2 * slot  # the budget holds even if calls turn slow
            for _ in range(calls[i]):
                t0 = time.perf_counter()
                fn()
                sync()
                samples[i].append(time.perf_counter() - t0)
                if t0 > deadline:
                    break
    return [statistics.median(s) * 1e6 for s in samples]


def benchmark(
    result: CompileResult,
    options: CompileOptions,
    packages: Packages,
    budget_s: float = 2.0,
    threads: int | None = 1,
) -> BenchResult:
    """Time eager and compiled forward and training step at each of options.benchmarkBatches.

    One intra-op thread by default: on a shared or CPU-limited node, OpenMP teams that spin-wait for
    a core they do not get stall for milliseconds (measured: eager fwd+bwd median 8.5 ms with 2
    threads vs 0.31 ms with 1 on a busy 2-core node), which would make the ratio noise.
    """
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _benchmark(result, options, packages, budget_s)
    finally:
        torch.set_num_threads(previous)


def _benchmark(
    result: CompileResult,
    options: CompileOptions,
    packages: Packages,
    budget_s: float,
) -> BenchResult:
    import torch

    from esper.tezzeret.compile import sample_inputs
    from esper.tezzeret.validate import train_step

    fwd = packages.forward
    module = result.module
    device = result.params[0].device if result.params else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = [b for b in options.benchmarkBatches if b <= options.maxBatch] or [options.maxBatch]
    slice_s = budget_s / (2 * len(batches))
    params = tuple(result.params)
    for p in module.parameters():
        p.requires_grad_(True)
    bench = BenchResult()
    for b in batches:
        xs = sample_inputs(result.input_specs, b, device, seed=b)
        with torch.no_grad():
            outs = module(*xs)
        outs_t = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        gs = [torch.ones_like(o) for o in outs_t]

        # A seed's input is a host activation: both sides compute its gradient, as the packages always do.
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in xs]

        def eager_train(xs: Sequence[torch.Tensor] = leaves, gs: Sequence[torch.Tensor] = gs) -> None:
            for t in (*module.parameters(), *xs):
                t.grad = None
            out = module(*xs)
            torch.autograd.backward(tuple(out) if isinstance(out, (tuple, list)) else (out,), list(gs))

        def compiled_train(xs: Sequence[torch.Tensor] = xs, gs: Sequence[torch.Tensor] = gs) -> None:
            train_step(result, packages, xs, gs)

        def eager_fwd(xs: Sequence[torch.Tensor] = xs) -> None:
            module(*xs)

        def compiled_fwd(xs: Sequence[torch.Tensor] = xs) -> None:
            fwd(*xs, params)

        with torch.inference_mode():
            e_fwd, c_fwd = interleaved_micros([eager_fwd, compiled_fwd], slice_s, sync)
        e_train, c_train = interleaved_micros([eager_train, compiled_train], slice_s, sync)
        bench.timings.append(BatchTiming(b, e_fwd, c_fwd, e_train, c_train))
    for p in module.parameters():
        p.grad = None
    return bench


def make_report(validation: ValidationResult, bench: BenchResult) -> ValidationReport:
    """The Kernel's report: errors from validation, latencies at the largest batch, geomean speedups."""
    last = bench.timings[-1]
    return ValidationReport(
        tolerance=validation.tolerance,
        maxAbsError=validation.max_abs_error,
        maxGradError=validation.max_grad_error,
        eagerMicros=round(last.eager_fwd, 2),
        compiledMicros=round(last.compiled_fwd, 2),
        speedup=round(bench.speedup, 4),
        trainSpeedup=round(bench.train_speedup, 4),
    )
