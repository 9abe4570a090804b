"""Compare the ways to ship a compiled seed to a live trainer, on one small module (fwd + bwd).

Roads: AOTInductor forward + backward packages (Esper's choice), torch.compile's portable cache
(`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`), and dynamo's AOT precompile
(`torch.compile(...).aot_compile` + `torch.compiler.load_compiled_function`).

Every phase runs in a fresh process with its own cold TORCHINDUCTOR_CACHE_DIR, as on a new node:
"build" compiles and saves, "load" starts from the saved artifact only and times the first training
step (what a trainer stalls on) and the steady one. Prints a table, writes
benchmarks/results/compile_roads.json.

    python benchmarks/compile_roads.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROADS = ("eager", "aoti", "cache-artifacts", "aot-compile")
BATCH = 32
RESULTS = Path(__file__).parent / "results"


class ResidualMLP(torch.nn.Module):
    """x + fc2(gelu(fc1(x))): a module-level class, so aot_compile's guard pickles can name it."""

    def __init__(self, features: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(features, hidden)
        self.fc2 = torch.nn.Linear(hidden, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _module() -> ResidualMLP:
    torch.manual_seed(0)
    return ResidualMLP()


def _call(module: Any, x: Any) -> Any:
    """The function aot_compile precompiles: the module is an argument, not a pickled closure."""
    return module(x)


def _steady(step: Any, reps: int = 200) -> float:
    for _ in range(10):
        step()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def _holds_pickle(path: Path) -> bool:
    """Whether loading this artifact unpickles something.

    A zip (the .pt2 packages) is judged by its member names. Anything else is scanned for pickle
    protocol 4/5 frame headers: the cache-artifact blob's outer format is a plain byte serializer,
    but the cache entries inside it are pickles that inductor/AOTAutograd unpickle on a cache hit.
    """
    import zipfile

    if zipfile.is_zipfile(path):
        names = zipfile.ZipFile(path).namelist()
        return any(n.endswith((".pkl", ".pickle", ".pt")) for n in names)
    data = path.read_bytes()
    return b"\x80\x04\x95" in data or b"\x80\x05\x95" in data


def build(road: str, out: Path) -> dict[str, Any]:
    module = _module()
    x = torch.randn(BATCH, 32)
    t0 = time.perf_counter()
    files: list[Path] = []
    if road == "eager":
        pass
    elif road == "aoti":
        from esper.contracts.common import CompileOptions
        from esper.tezzeret.compile import InputSpec, compile_module

        r = compile_module(module, [InputSpec("x", (32,))], "cpu", CompileOptions(maxBatch=1024), out)
        files = [r.forward_path, r.train_forward_path, r.train_backward_path]
        saved = [{"kind": s.kind, "index": s.index} for s in r.saved]
        (out / "saved.json").write_text(json.dumps(saved))  # what the load phase's step hands over
    elif road == "cache-artifacts":
        cm = torch.compile(module, dynamic=True)
        cm(x.requires_grad_()).sum().backward()
        blob, _ = torch.compiler.save_cache_artifacts()
        (out / "cache.bin").write_bytes(blob)
        files = [out / "cache.bin"]
    else:
        compiled = torch.compile(_call, fullgraph=True, dynamic=True).aot_compile(((module, x), {}))
        compiled.save_compiled_function(str(out / "fn.bin"))
        files = [out / "fn.bin"]
    seconds = time.perf_counter() - t0
    return {
        "buildSeconds": round(seconds, 2),
        "bytes": sum(f.stat().st_size for f in files),
        "files": [f.name for f in files],
        "pickle": any(_holds_pickle(f) for f in files),
    }


def load(road: str, out: Path) -> dict[str, Any]:
    module = _module()
    params = tuple(p.detach() for p in module.parameters())
    x = torch.randn(BATCH, 32)
    g = torch.ones(BATCH, 32)
    res: dict[str, Any] = {"backward": True, "note": ""}
    for p in module.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    if road == "aoti":
        from types import SimpleNamespace

        from esper.aoti import gather_saved
        from esper.tezzeret.validate import load_packages

        b = out / "bundle"
        _, train_fwd, train_bwd = load_packages(
            b / "forward.pt2", b / "train_forward.pt2", b / "train_backward.pt2"
        )
        saved = [SimpleNamespace(**s) for s in json.loads((out / "saved.json").read_text())]

        def step() -> None:
            res = train_fwd(x, params)
            train_bwd(*gather_saved(saved, [x], res[:1], res[1:]), g, params)

    elif road == "cache-artifacts":
        torch.compiler.load_cache_artifacts((out / "cache.bin").read_bytes())
        cm = torch.compile(module, dynamic=True)

        def step() -> None:
            cm(x).backward(g)

    elif road == "eager":

        def step() -> None:
            module(x).backward(g)

    else:
        with open(out / "fn.bin", "rb") as f:
            fn = torch.compiler.load_compiled_function(f)

        def step() -> None:
            fn(module, x).backward(g)

    res["loadSeconds"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    try:
        step()
    except Exception as e:  # the road may not support training
        res.update(backward=False, note=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return res
    res["firstStepSeconds"] = round(time.perf_counter() - t0, 3)
    res["steadyStepMicros"] = round(_steady(step), 1)
    return res


def _phase(road: str, phase: str, out: Path) -> dict[str, Any]:
    # VEC_ISA_OK skips inductor's gcc probe of the CPU on every road alike (seconds per cold process).
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(out / f"cache-{phase}"),
        "TORCHINDUCTOR_VEC_ISA_OK": "1",
    }
    if phase == "load":  # one intra-op thread: spinning OpenMP teams on a busy node make steady times noise
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", road, phase, str(out)],
        env=env, capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(lines[-1])


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    rows = {}
    with tempfile.TemporaryDirectory(prefix="roads-") as tmp:
        for road in ROADS:
            out = Path(tmp) / road
            out.mkdir()
            rows[road] = {**_phase(road, "build", out), **_phase(road, "load", out)}
    table = Table(
        title=f"Compile roads: residual MLP 32/64, batch {BATCH}, fwd+bwd, fresh process, cold cache"
    )
    cols = (
        "buildSeconds",
        "bytes",
        "pickle",
        "loadSeconds",
        "firstStepSeconds",
        "steadyStepMicros",
        "backward",
    )
    table.add_column("road")
    for c in (*cols, "note"):
        table.add_column(c)
    for road, r in rows.items():
        table.add_row(road, *(str(r.get(c, "-")) for c in cols), str(r.get("note") or r.get("error") or ""))
    Console(width=200).print(table)
    RESULTS.mkdir(exist_ok=True)
    doc = {"torch": torch.__version__, "cpus": os.cpu_count(), "batch": BATCH, "roads": rows}
    (RESULTS / "compile_roads.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        fn = build if sys.argv[3] == "build" else load
        print(json.dumps(fn(sys.argv[2], Path(sys.argv[4]))), flush=True)
    else:
        main()
