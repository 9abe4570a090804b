"""The CUDA path end to end on the GPU of this machine: compile Job, load, numerics, speed.

For each template: the compile Job (`python -m esper.tezzeret`, a fresh process) compiles it for this
GPU's target (`cuda-smNN` from the device's compute capability) into a temporary local store; then this
process verifies and loads the bundle on the GPU, checks forward and gradients against the eager module
at several batches, grows it into a seed slot of a small host and trains a few steps, and times eager vs
compiled (forward and training step) with CUDA events.

    python benchmarks/cuda.py [--quick] [--jobs N] [--keep DIR]

The compile Jobs run side by side; each template's checks run in a process of their own, so a crash
in native code is recorded for that template and the others still run. The JSON is rewritten after
every template.

Prints a table and writes benchmarks/results/cuda.json. Needs a CUDA GPU; exits 2 without one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
TEMPLATES: dict[str, dict[str, Any]] = {
    "residual-mlp": {"features": 256, "hidden": 1024, "blocks": 2},
    "lora-adapter": {"features": 256, "rank": 16},
    "transformer-mlp": {"features": 256, "hidden": 1024},
    "attention-block": {"embed": 128, "heads": 4, "seq": 64},
    "bottleneck": {"features": 256, "bottleneck": 64},
    "conv-block": {"channels": 32, "height": 16, "width": 16},
}
QUICK = ("residual-mlp", "attention-block")
BATCHES = [32, 256]
MAX_BATCH = 512


def _cuda_events_ms(fn: Any, reps: int) -> float:
    """Median milliseconds of `fn()` on the current stream, timed with CUDA events."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def compile_job(name: str, params: dict[str, Any], target: str, work: Path) -> dict[str, Any]:
    """Run the compile Job's entrypoint in a fresh process; return its result JSON plus wall time."""
    spec = {
        "template": {"name": name, "params": params},
        "targets": [target],
        "compile": {"maxBatch": MAX_BATCH},
    }
    bp = work / f"{name}.json"
    bp.write_text(json.dumps(spec))
    result = work / f"{name}.result.json"
    cmd = [sys.executable, "-m", "esper.tezzeret", "--blueprint", str(bp), "--target", target]
    cmd += ["--store", str(work / "store"), "--result-path", str(result)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1200)
    wall = time.perf_counter() - t0
    doc: dict[str, Any] = {"exitCode": proc.returncode, "wallSeconds": round(wall, 2)}
    if result.exists():
        doc["result"] = json.loads(result.read_text() or "{}")
    if proc.returncode:
        doc["stderrTail"] = proc.stderr[-4000:]
    return doc


def check_kernel(name: str, params: dict[str, Any], bundle: Path, sha: str, reps: int) -> dict[str, Any]:
    """Load on the GPU, compare with eager (outputs and gradients), seed a host, time both."""
    import torch

    from esper.blueprint import build_module, validate_source
    from esper.kasmina import SeedState, load_kernel, wrap

    dev = torch.device("cuda")
    t0 = time.perf_counter()
    kernel = load_kernel(bundle, expected_sha256=sha, device=dev)
    load_s = time.perf_counter() - t0
    eager = build_module(validate_source({"template": {"name": name, "params": params}}), seed=0)
    eager = eager.to(dev).eval()
    shape = [int(d) for d in kernel.input_shapes[0][1:]]
    out: dict[str, Any] = {"loadSeconds": round(load_s, 4), "sampleShape": shape, "batches": {}}
    worst_out = worst_grad = 0.0
    for batch in [1, *BATCHES, MAX_BATCH]:
        x = torch.randn(batch, *shape, device=dev)
        xe, xk = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye, yk = eager(xe), kernel(xk)
        g = torch.randn_like(ye)
        ye.backward(g)
        yk.backward(g)
        worst_out = max(worst_out, (ye - yk).abs().max().item())
        worst_grad = max(worst_grad, (xe.grad - xk.grad).abs().max().item())
        gp_e = [p.grad for p in eager.parameters()]
        gp_k = [p.grad for p in kernel.params]
        for a, b in zip(gp_e, gp_k, strict=True):
            worst_grad = max(worst_grad, (a - b).abs().max().item())
        eager.zero_grad(set_to_none=True)
        kernel.zero_grad(set_to_none=True)
    out["maxAbsError"], out["maxGradError"] = worst_out, worst_grad
    for batch in BATCHES:
        x = torch.randn(batch, *shape, device=dev)
        with torch.no_grad():
            fe = _cuda_events_ms(lambda x=x: eager(x), reps)
            fk = _cuda_events_ms(lambda x=x: kernel(x), reps)
        xr = x.clone().requires_grad_(True)

        def step(m: Any, xr: Any = xr) -> None:
            m(xr).sum().backward()

        te = _cuda_events_ms(lambda: step(eager), reps)
        tk = _cuda_events_ms(lambda: step(kernel), reps)
        out["batches"][str(batch)] = {
            "eagerForwardMs": fe,
            "compiledForwardMs": fk,
            "forwardSpeedup": fe / fk,
            "eagerStepMs": te,
            "compiledStepMs": tk,
            "stepSpeedup": te / tk,
        }
    # Grow it into a host: a dormant slot is the identity, a training seed learns, the host keeps going.
    host = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity()).to(dev)
    slots = wrap(host, at=["0"])
    slot = slots["0"]
    x = torch.randn(16, *shape, device=dev)
    assert torch.equal(host(x), x), "a dormant slot must be an exact identity"
    slot.germinate(kernel)
    slot.start_training()
    opt = torch.optim.SGD(kernel.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        host(x).square().mean().backward()
        opt.step()
        slot.step()
    out["seedState"] = slot.state.value if isinstance(slot.state, SeedState) else str(slot.state)
    return out


def _check_in_child(name: str, bundle: Path, sha: str, reps: int, work: Path) -> dict[str, Any]:
    """Run `check_kernel` in a fresh process, so a crash in native code (a segfault while loading a
    package) is recorded with its traceback and the other templates still run."""
    out = work / f"{name}.runtime.json"
    cmd = [sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()), "--check-one", name]
    cmd += ["--bundle", str(bundle), "--sha", sha, "--reps", str(reps), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    if proc.returncode == 0 and out.exists():
        return {"runtime": json.loads(out.read_text())}
    return {"runtimeError": f"exit {proc.returncode}\n{proc.stderr[-4000:]}"}


def _write(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=0, help="compile Jobs at once (default: cores / 4)")
    ap.add_argument("--keep", type=Path, help="keep the store and results here")
    ap.add_argument("--out", type=Path, default=RESULTS / "cuda.json")
    ap.add_argument("--check-one", metavar="TEMPLATE", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--sha", help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    if args.check_one:
        _write(
            check_kernel(args.check_one, TEMPLATES[args.check_one], args.bundle, args.sha, args.reps),
            args.out,
        )
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure", file=sys.stderr)
        return 2
    major, minor = torch.cuda.get_device_capability()
    target = f"cuda-sm{major}{minor}"
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "target": target,
        "torch": torch.__version__,
        "cudaRuntime": torch.version.cuda,
        "python": platform.python_version(),
        "templates": {},
    }
    names = QUICK if args.quick else tuple(TEMPLATES)
    work = args.keep or Path(tempfile.mkdtemp(prefix="esper-cuda-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    jobs = args.jobs or max(1, (os.cpu_count() or 4) // 4)
    print(f"compiling {len(names)} templates for {target}, {jobs} Jobs at once", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        futures = {name: pool.submit(compile_job, name, TEMPLATES[name], target, work) for name in names}
        for name in names:
            job = futures[name].result()
            report["templates"][name] = {"params": TEMPLATES[name], "job": job}
            print(f"== {name}: compile Job exit {job['exitCode']} in {job['wallSeconds']} s", flush=True)
    _write(report, args.out)
    for name in names:
        entry = report["templates"][name]
        res = entry["job"].get("result", {})
        if entry["job"]["exitCode"] != 0 or "key" not in res:
            print(f"   {name}: compile failed: {json.dumps(res)[:600]}", flush=True)
            print(entry["job"].get("stderrTail", "")[-2000:], flush=True)
            continue
        bundle = work / "store" / "kernels" / res["key"]
        entry.update(_check_in_child(name, bundle, res["manifestSha256"], args.reps, work))
        print(f"== {name}: " + ("checked" if "runtime" in entry else entry["runtimeError"]), flush=True)
        _write(report, args.out)
    print(f"\n{report['device']}  target {target}  torch {report['torch']}")
    head = f"{'template':18} {'job s':>7} {'load ms':>8} {'max err':>9} {'grad err':>9}"
    head += "".join(f" {'fwd x@' + b:>9} {'step x@' + b:>10}" for b in map(str, BATCHES))
    print(head)
    ok = True
    for name, e in report["templates"].items():
        rt = e.get("runtime")
        if rt is None:
            ok = False
            why = "runtime" if "runtimeError" in e else f"compile exit {e['job']['exitCode']}"
            print(f"{name:18} FAILED ({why})")
            continue
        row = f"{name:18} {e['job']['wallSeconds']:>7.1f} {rt['loadSeconds'] * 1e3:>8.1f}"
        row += f" {rt['maxAbsError']:>9.2e} {rt['maxGradError']:>9.2e}"
        for b in map(str, BATCHES):
            row += f" {rt['batches'][b]['forwardSpeedup']:>9.2f} {rt['batches'][b]['stepSpeedup']:>10.2f}"
        print(row)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
