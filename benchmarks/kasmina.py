"""Kasmina's costs, measured in one run.

(a) dormant overhead: a training step (forward + backward + Adam) of a host with N dormant seed slots
    (N = 4 and 16 wrapping its blocks, `step_slots` called every step as the trainer protocol says)
    over the bare host. Target <= 1.005. Measured paired: each round times every model back to back
    in a rotating order (ABC, BCA, CAB, ...) and the ratio is taken within the round, so machine-wide
    drift cancels; reported as the median over rounds with its p10-p90 spread.
(b) first step after a hot load: a real compiled kernel (AOTInductor forward + backward) germinated
    into a host's slot while it trains; the first training step after it over a steady step of the
    same model. Target <= 2.
(c) kernel load time: `load_kernel` (signature, hashes, private copy, both packages) after `warmup()`, whose
    own time is reported apart. Target <= 0.5 s.
(d) micro: the per-step cost of one dormant slot (forward + `step()`, default telemetry sampling) over
    the bare submodule, in µs, and the cost of one activation-statistics sample.
(e) the kernel-call guard: the check of a call's inputs against the manifest on its own, a kernel
    call (forward, no_grad) with it, the same call without it, the call as it was before the guard
    (a maxBatch check only), and the bare package, in µs, at batch 1 and 64.

    python benchmarks/kasmina.py [--store DIR] [--quick] [--guard-only]

The kernel comes from `--store` (default .esper/bench-store): the first bundle whose input is
[batch, F]; if there is none, examples/transformer-mlp.yaml is compiled into it first (~30 s).
Threads are pinned (`--threads`, default 1) because the machine is shared and small: every figure is
a median of many interleaved repetitions, and still noisy; the JSON keeps the spreads.
Prints rich tables and writes benchmarks/results/kasmina.json.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
DEFAULT_STORE = ROOT / ".esper" / "bench-store"
SMALL_BLUEPRINT = ROOT / "examples" / "transformer-mlp.yaml"


def pct(xs: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    i = q * (len(s) - 1)
    lo = int(i)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


class Host(nn.Module):
    """An MLP with `depth` residual-free blocks of Linear(width, width) + GELU: the slots' targets."""

    def __init__(self, width: int, depth: int, d_in: int = 64, d_out: int = 16) -> None:
        super().__init__()
        self.stem = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth))
        self.head = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def make_stepper(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One trainer step: forward, MSE, backward, Adam, then `step_slots` if the model has slots."""
    from esper.kasmina import slots, step_slots

    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    has_slots = bool(slots(model))

    def step() -> None:
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if has_slots:
            step_slots(model)

    return step


def timed_each(fn: Callable[[], None], k: int) -> list[float]:
    """Seconds of each of `k` calls, GC off (a collection inside a sample is noise, not the code;
    one collection before the sample, not per call: a full collection costs milliseconds)."""
    gc.collect()
    gc.disable()
    out = []
    try:
        for _ in range(k):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out
    finally:
        gc.enable()


def timed(fn: Callable[[], None], k: int) -> float:
    """Seconds for `k` calls in a row, GC off."""
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        return time.perf_counter() - t0
    finally:
        gc.enable()


# ---------------------------------------------------------------- (a)


def dormant_overhead(
    width: int, depth: int, batch: int, counts: Sequence[int], rounds: int, k: int
) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry

    from esper.kasmina import KasminaMetrics, wrap

    torch.manual_seed(0)
    base = Host(width, depth)
    x, y = torch.randn(batch, 64), torch.randn(batch, 16)
    models: dict[str, nn.Module] = {"bare": base}
    for n in counts:
        m = copy.deepcopy(base)
        every = max(1, depth // n)
        names = [f"blocks.{i}" for i in range(0, depth, every)][:n]
        wrap(m, names, metrics=KasminaMetrics(CollectorRegistry()))
        models[f"{n} dormant"] = m
    steppers = {name: make_stepper(m, x, y) for name, m in models.items()}
    for s in steppers.values():  # warm-up: allocator, Adam state, the slots' first observation
        timed(s, 20)
    names = list(steppers)
    times: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        # The fastest of k steps: other processes only ever add time, so the minimum is the
        # estimate of a step's own cost least disturbed by a shared machine.
        got = {n: min(timed_each(steppers[n], k)) for n in order}
        for n in names:
            times[n].append(got[n])
        for n in names[1:]:
            ratios[n].append(got[n] / got["bare"])
    out: dict[str, Any] = {
        "host": {
            "width": width,
            "depth": depth,
            "batch": batch,
            "params": sum(p.numel() for p in base.parameters()),
        },
        "rounds": rounds,
        "stepsPerSample": k,
        "stepMs": {n: round(statistics.median(t) * 1e3, 4) for n, t in times.items()},  # of per-round minima
        "estimator": "per round: min of k steps per model; ratio within the round; median over rounds",
        "ratios": {},
    }
    for n, rs in ratios.items():
        out["ratios"][n] = {
            "slots": int(n.split()[0]),
            "median": round(statistics.median(rs), 5),
            "p10": round(pct(rs, 0.1), 5),
            "p90": round(pct(rs, 0.9), 5),
            "ratioOfMedians": round(statistics.median(times[n]) / statistics.median(times["bare"]), 5),
        }
    return out


# ---------------------------------------------------------------- (d)


def dormant_micro(width: int, batch: int, calls: int, repeats: int) -> dict[str, Any]:
    """Per-step cost of one dormant slot around an Identity, split into forward, `step()`, and the
    telemetry sample (a dormant slot's default: the activation's mean/std every `idle_sample_every`
    = 200 steps), vs the Identity; and one telemetry sample (`observe`) on its own."""
    from prometheus_client import CollectorRegistry

    from esper.kasmina import KasminaMetrics, SeedSlot

    x = torch.randn(batch, width)
    ident = nn.Identity()
    plain = SeedSlot(
        "micro0",
        nn.Identity(),
        sample_every=0,
        idle_sample_every=0,
        metrics=KasminaMetrics(CollectorRegistry()),
    )
    sampled = SeedSlot("micro200", nn.Identity(), metrics=KasminaMetrics(CollectorRegistry()))
    plain(x)
    sampled(x)
    loops: dict[str, Callable[[], None]] = {
        "identity": lambda: ident(x),
        "slotForward": lambda: plain(x),
        "slotStep": plain.step,
        "slotForwardStepSampled": lambda: (sampled(x), sampled.step()),
        "observe": lambda: sampled.telemetry.observe(x),
    }
    times: dict[str, list[float]] = {n: [] for n in loops}
    for _ in range(repeats):
        for n, fn in loops.items():
            times[n].append(timed(fn, calls) / calls * 1e6)
    us = {n: statistics.median(t) for n, t in times.items()}
    return {
        **{f"{n}Us": round(v, 3) for n, v in us.items()},
        "overheadUsPerSlotStep": round(us["slotForwardStepSampled"] - us["identity"], 3),
        "idleSampleEvery": sampled.idle_sample_every,
        "activation": [batch, width],
        "calls": calls,
        "repeats": repeats,
    }


# ---------------------------------------------------------------- kernel


def find_kernel(store_dir: Path, console: Any) -> tuple[Path, str, int]:
    """(verified local bundle, manifest sha256, feature width) of a [batch, F] kernel in the store,
    compiling SMALL_BLUEPRINT into it first if it has none."""
    from esper.artifact import sha256_bytes
    from esper.signing import SignatureError, TrustedKeys
    from esper.storage import open_store
    from esper.tezzeret.entrypoint import command

    store = open_store(str(store_dir))
    trusted = TrustedKeys.from_env()

    def signed(key: str) -> bool:
        try:
            trusted.verify(store.read_manifest_bytes(key), store.read_signature_bytes(key))
        except SignatureError:
            return False  # an older, unsigned bundle: recompiled (and replaced) below
        return True

    def pick() -> tuple[str, int] | None:
        for key in store.list_keys():
            m = store.read_manifest(key)
            if (
                signed(key)
                and m.inputs
                and len(m.inputs[0].shape) == 2
                and m.outputs
                and m.outputs[0].shape == m.inputs[0].shape
            ):
                return key, int(m.inputs[0].shape[1])
        return None

    found = pick()
    if found is None:
        console.print(f"no [batch, F] kernel in {store_dir}: compiling {SMALL_BLUEPRINT.name} (~30 s)")
        cmd = command(SMALL_BLUEPRINT, target="cpu", store=store_dir, result_path=os.devnull)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"compile failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        trusted = TrustedKeys.from_env()  # the compile created the local key pair if there was none
        found = pick()
        assert found is not None
    key, width = found
    sha = sha256_bytes(store.read_manifest_bytes(key))
    bundle = store.fetch_bundle(key, store_dir.parent / "bench-bundles" / key, sha, trusted=trusted)
    return bundle, sha, width


# ---------------------------------------------------------------- (c)


def load_times(bundle: Path, sha: str, loads: int) -> dict[str, Any]:
    """`load_kernel` as shipped (signature checked against $ESPER_TRUSTED_KEYS / the local key) and,
    interleaved with it, the same load with the signature check replaced by a no-op: their medians'
    difference is what checking signatures costs per load (key lookup, file stat, ed25519 verify)."""
    from prometheus_client import CollectorRegistry

    from esper.kasmina import KasminaMetrics, load_kernel, warmup
    from esper.signing import TrustedKeys

    class NoCheck(TrustedKeys):
        def verify(self, manifest_bytes: bytes, signature_bytes: bytes | None, source: str = "") -> str:
            return ""

    cold = "torch._inductor" not in sys.modules
    warm_s = warmup()
    metrics = KasminaMetrics(CollectorRegistry())
    secs: list[float] = []
    unchecked: list[float] = []
    no_check = NoCheck([])
    for _ in range(loads):
        t0 = time.perf_counter()
        load_kernel(bundle, sha, metrics=metrics)
        secs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        load_kernel(bundle, sha, metrics=metrics, trusted_keys=no_check)
        unchecked.append(time.perf_counter() - t0)
    pair = _signed_pair(bundle)
    verify_s = timed(lambda: TrustedKeys.from_env().verify(*pair), 200) / 200
    return {
        "warmupSeconds": round(warm_s, 3),
        "warmupWasCold": cold,
        "firstLoadSeconds": round(secs[0], 4),
        "medianLoadSeconds": round(statistics.median(secs), 4),
        "maxLoadSeconds": round(max(secs), 4),
        "medianLoadSecondsWithoutSignatureCheck": round(statistics.median(unchecked[1:] or unchecked), 4),
        "signatureCheckSeconds": round(verify_s, 6),
        "loads": loads,
    }


def _signed_pair(bundle: Path) -> tuple[bytes, bytes | None]:
    from esper.artifact import read_manifest_bytes, read_signature_bytes

    return read_manifest_bytes(bundle), read_signature_bytes(bundle)


# ---------------------------------------------------------------- (b)


def first_step(bundle: Path, sha: str, width: int, batch: int, trials: int, steady: int) -> dict[str, Any]:
    """Per trial: a fresh host trains dormant, then a slot germinates the kernel from the bundle
    (verify, load, probe) and starts training it; time the first step, then `steady` more."""
    from prometheus_client import CollectorRegistry

    from esper.kasmina import KasminaMetrics, wrap

    torch.manual_seed(0)
    base = Host(width, depth=8, d_in=width)
    x, y = torch.randn(batch, width), torch.randn(batch, 16)
    rows = []
    for t in range(trials):
        model = copy.deepcopy(base)
        slots = wrap(model, [f"blocks.{i}" for i in range(8)], metrics=KasminaMetrics(CollectorRegistry()))
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        from esper.kasmina import step_slots

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_slots(model)

        timed(step, 20)
        slot = slots[f"blocks.{t % 8}"]
        t0 = time.perf_counter()
        ok = slot.germinate(bundle, expected_sha256=sha)
        germinate_s = time.perf_counter() - t0
        assert ok, slot.telemetry.last_error
        opt.add_param_group(slot.param_group())
        slot.start_training()
        first, *samples = timed_each(step, steady + 1)
        med = statistics.median(samples[steady // 4 :])  # the steady state: skip the settling steps
        rows.append(
            {
                "germinateSeconds": round(germinate_s, 4),
                "firstStepMs": round(first * 1e3, 3),
                "secondStepMs": round(samples[0] * 1e3, 3),
                "steadyStepMs": round(med * 1e3, 3),
                "ratio": round(first / med, 3),
            }
        )
    ratios = [r["ratio"] for r in rows]
    return {
        "host": {"width": width, "depth": 8, "batch": batch},
        "trials": rows,
        "medianRatio": round(statistics.median(ratios), 3),
        "maxRatio": round(max(ratios), 3),
        "firstTrialRatio": ratios[0],
    }


# ---------------------------------------------------------------- (e)


def guard_micro(bundle: Path, sha: str, width: int, calls: int, repeats: int) -> dict[str, Any]:
    """Per kernel call: the input check alone (`_match`), the guarded call (`kernel(x)`), the same
    autograd Function without the check, the call as it was before the guard (maxBatch check,
    parameters from iterating the ParameterList), and the bare package; medians of interleaved
    repeats."""
    from prometheus_client import CollectorRegistry

    from esper.kasmina import KasminaMetrics, load_kernel, warmup
    from esper.kasmina.kernel import _CompiledFunction

    warmup()
    k = load_kernel(bundle, sha, metrics=KasminaMetrics(CollectorRegistry()))
    params = k._modules["params"]._parameters.values()  # type: ignore[union-attr]

    def before(x: torch.Tensor) -> Any:
        if x.shape[0] > (k.max_batch or 0):
            raise ValueError("maxBatch")
        return _CompiledFunction.apply(k, {}, x.contiguous(), *k.params)

    ptuple = tuple(params)

    def loops_for(x: torch.Tensor) -> dict[str, Callable[[], Any]]:
        return {
            "check": lambda: k._match((x,), k._in_expects, {}),
            "guarded": lambda: k(x),
            "unguarded": lambda: _CompiledFunction.apply(k, {}, x, *params),
            "before": lambda: before(x),
            "package": lambda: k.forward_runner(x, ptuple),
        }

    rows = {}
    for batch in (1, 64):
        loops = loops_for(torch.randn(batch, width))
        times: dict[str, list[float]] = {n: [] for n in loops}
        with torch.no_grad():
            for _ in range(repeats):
                for n, fn in loops.items():
                    times[n].append(timed(fn, calls) / calls * 1e6)
        us = {n: statistics.median(t) for n, t in times.items()}
        rows[str(batch)] = {
            **{f"{n}Us": round(v, 3) for n, v in us.items()},
            "addedUs": round(us["guarded"] - us["unguarded"], 3),
            "addedFraction": round(us["guarded"] / us["unguarded"] - 1, 4),
            "vsBeforeUs": round(us["guarded"] - us["before"], 3),
        }
    return {"width": width, "calls": calls, "repeats": repeats, "byBatch": rows}


def print_loads(console: Any, c: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"(c) kernel load, {c['loads']} interleaved pairs")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_column("target", justify="right")
    for _, row in load_rows(c):
        t.add_row(*row)
    console.print(t)


def load_rows(c: dict[str, Any]) -> list[tuple[str, tuple[str, str, str]]]:
    """The (c) rows of both tables: load median with and without the signature check."""
    unchecked = c["medianLoadSecondsWithoutSignatureCheck"] * 1e3
    extra = c["medianLoadSeconds"] * 1e3 - unchecked
    ok = "[green]ok" if extra <= 5 else "[red]over"
    return [
        ("load", ("load median, signature checked", f"{c['medianLoadSeconds'] * 1e3:.1f} ms", "")),
        (
            "unchecked",
            (
                "load median, no signature check",
                f"{unchecked:.1f} ms",
                "",
            ),
        ),
        ("delta", ("signature check, added to the median", f"{extra:+.2f} ms", f"<= 5 ms {ok}")),
        ("verify", ("ed25519 verify + key lookup alone", f"{c['signatureCheckSeconds'] * 1e6:.0f} µs", "")),
    ]


def print_guard(console: Any, e: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"(e) kernel-call guard, width {e['width']}, µs per call (median of {e['repeats']})")
    cols: tuple[str, ...] = ("batch", "check alone", "guarded call", "no check", "added", "added %")
    cols = (*cols, "before the guard", "package")
    for col in cols:
        t.add_column(col, justify="right")
    for b, r in e["byBatch"].items():
        t.add_row(
            b,
            f"{r['checkUs']:.2f}",
            f"{r['guardedUs']:.2f}",
            f"{r['unguardedUs']:.2f}",
            f"{r['addedUs']:.2f}",
            f"{100 * r['addedFraction']:.1f}",
            f"{r['beforeUs']:.2f}",
            f"{r['packageUs']:.2f}",
        )
    console.print(t)


# ---------------------------------------------------------------- main


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=DEFAULT_STORE, help="kernel store (a local directory)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, not for numbers)")
    ap.add_argument("--guard-only", action="store_true", help="only (e), the kernel-call guard")
    ap.add_argument("--load-only", action="store_true", help="only (c), kernel load times")
    args = ap.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 120)
    torch.set_num_threads(args.threads)
    logging.getLogger("torch.export.pt2_archive._package").setLevel(logging.ERROR)  # the avx2-on-avx512 note
    q = args.quick
    t_start = time.perf_counter()

    bundle, sha, width = find_kernel(args.store, console)
    console.print("(e) kernel-call guard ...")
    e = guard_micro(bundle, sha, width, calls=500 if q else 2000, repeats=5 if q else 21)
    if args.guard_only:
        print_guard(console, e)
        return
    console.print(f"(c) kernel load: {bundle.name[:16]} (width {width}) ...")
    c = load_times(bundle, sha, loads=3 if q else 10)  # first: warmup() is a start-up cost
    if args.load_only:
        print_loads(console, c)
        return
    console.print("(a) dormant overhead: interleaved rounds ...")
    a = dormant_overhead(width=256, depth=16, batch=256, counts=(4, 16), rounds=8 if q else 60, k=9)
    console.print("(d) dormant-slot micro ...")
    d = dormant_micro(width=256, batch=256, calls=2000, repeats=5 if q else 21)
    bare_us = a["stepMs"]["bare"] * 1e3
    for r in a["ratios"].values():  # what the micro numbers predict for this host
        r["predictedFromMicro"] = round(1 + r["slots"] * d["overheadUsPerSlotStep"] / bare_us, 5)
    console.print("(b) first step after a hot load ...")
    b = first_step(bundle, sha, width, batch=512, trials=3 if q else 8, steady=40 if q else 100)

    h = a["host"]
    t = Table(
        title=f"(a) step time with N dormant slots / bare host (width {h['width']}, {h['depth']} blocks, "
        f"batch {h['batch']}, {a['rounds']} interleaved rounds)"
    )
    for col in ("model", "step ms (min of 9)", "ratio median", "p10-p90", "from micro (d)", "target (micro)"):
        t.add_column(col, justify="left" if col == "model" else "right")
    t.add_row("bare", f"{a['stepMs']['bare']:.3f}", "1", "", "", "")
    for n, r in a["ratios"].items():
        # The verdict uses the micro-derived ratio: on a shared 2-core machine the direct paired
        # ratio's spread (p10-p90) is far wider than the 0.5% it would have to resolve.
        ok = "[green]ok" if r["predictedFromMicro"] <= 1.005 else "[red]over"
        t.add_row(
            n,
            f"{a['stepMs'][n]:.3f}",
            f"{r['median']:.4f}",
            f"{r['p10']:.4f}-{r['p90']:.4f}",
            f"{r['predictedFromMicro']:.4f}",
            f"<= 1.005 {ok}",
        )
    console.print(t)
    t = Table(title="(b) first training step after a hot load / steady step (per trial)")
    for col in ("trial", "germinate s", "first ms", "2nd ms", "steady ms", "ratio"):
        t.add_column(col, justify="right")
    for i, r in enumerate(b["trials"]):
        t.add_row(
            str(i),
            f"{r['germinateSeconds']:.3f}",
            f"{r['firstStepMs']:.2f}",
            f"{r['secondStepMs']:.2f}",
            f"{r['steadyStepMs']:.2f}",
            f"{r['ratio']:.2f}",
        )
    ok = "[green]ok" if b["medianRatio"] <= 2 else "[red]over"
    t.add_row("median", "", "", "", "", f"{b['medianRatio']:.2f} (target <= 2 {ok})")
    console.print(t)
    t = Table(title="(c) kernel load (verify + both AOTInductor packages) and (d) dormant-slot micro")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("target", justify="right")
    ok = "[green]ok" if c["maxLoadSeconds"] <= 0.5 else "[red]over"
    t.add_row(
        "warmup() at start-up" + (" (cold)" if c["warmupWasCold"] else ""), f"{c['warmupSeconds']:.2f} s", ""
    )
    t.add_row("first load after warmup", f"{c['firstLoadSeconds'] * 1e3:.1f} ms", "")
    t.add_row(
        f"load, median / max of {c['loads']}",
        f"{c['medianLoadSeconds'] * 1e3:.1f} / {c['maxLoadSeconds'] * 1e3:.1f} ms",
        f"<= 500 ms {ok}",
    )
    for _, row in load_rows(c):
        t.add_row(*row)
    t.add_row(
        f"(d) identity forward, [{d['activation'][0]}, {d['activation'][1]}]", f"{d['identityUs']:.2f} µs", ""
    )
    t.add_row("(d) dormant slot forward", f"{d['slotForwardUs']:.2f} µs", "")
    t.add_row("(d) dormant slot step()", f"{d['slotStepUs']:.2f} µs", "")
    t.add_row(
        f"(d) forward + step(), telemetry every {d['idleSampleEvery']} steps",
        f"{d['slotForwardStepSampledUs']:.2f} µs",
        "",
    )
    t.add_row("(d) one telemetry sample (std_mean of a strided subsample)", f"{d['observeUs']:.2f} µs", "")
    t.add_row("(d) overhead per slot per training step", f"{d['overheadUsPerSlotStep']:.2f} µs", "<= 8 µs")
    console.print(t)
    print_guard(console, e)

    doc = {
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "quick": q,
        "seconds": round(time.perf_counter() - t_start, 1),
        "kernel": bundle.name,
        "dormantOverhead": a,
        "firstStepAfterHotLoad": b,
        "kernelLoad": c,
        "dormantMicro": d,
        "kernelGuard": e,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kasmina.json").write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"wrote {RESULTS / 'kasmina.json'} ({doc['seconds']} s; a shared 2-core machine: noisy)")


if __name__ == "__main__":
    main()
