"""How fast a compiled training step can be on this machine: eager's step over its products alone.

A compiled kernel runs its matrix products and convolutions in the same MKL and oneDNN routines as
eager (inductor emits them as calls into ATen) and fuses everything else into its own loops. Its
step can therefore take no less than those calls take, and eager's step over their time bounds the
training-step ratio `benchmarks/compile.py` measures, as long as the products run in those routines.

Per template and batch, this compiles the kernel as `compile.py` does, records every mm, addmm, bmm,
convolution and convolution_backward that eager's forward + backward dispatches (attention in its
math form, which is how CPU kernels compile it), and times eager's step, the kernel's step (its two
packages) and each product alone on copies with the same shapes and strides, all interleaved, one
thread, glibc thresholds as in `compile.py`, the median of `--repeat` rounds. A product timed alone
and repeated has its inputs in cache, which in a step they may not be: the sum is a floor, eager over
it a ceiling. The floor also counts ATen's dispatch of each call (a few µs), so at small sizes a
kernel can come close to it or under it. Printed per template (geometric means over the batches, as
`compile.py` takes them): the speedup, the ceiling, the share of the ceiling reached (the speedup
over the ceiling, independent of eager's time), and the products' throughput at batch 512 (FLOPs as
`torch.utils.flop_counter` counts them, over their time).

    python benchmarks/compile_floor.py [--target cpu-avx512] [--repeat 3]

Writes benchmarks/results/compile_floor.json (compile_floor-<target>.json for another target).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from compile import BATCHES, RESULTS, TEMPLATES, allocation

aten = torch.ops.aten
PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.convolution.default,
            aten.convolution_backward.default}  # fmt: skip


def _copy(x: Any) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
    return out.copy_(x)


class Products(TorchDispatchMode):
    """Records (op, copied args) for every matrix product and convolution dispatched under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in PRODUCTS:
            self.calls.append((func, tuple(_copy(a) for a in args), dict(kwargs)))
        return func(*args, **kwargs)


def measure(name: str, target: str, workdir: Path, repeat: int) -> list[dict[str, Any]]:
    """Per batch: eager's step, the compiled kernel's (its two packages, as `compile.py` times them) and
    the products alone, interleaved in the same blocks, the median of `repeat` rounds."""
    from esper.blueprint import validate_source
    from esper.contracts.common import CompileOptions
    from esper.tezzeret.bench import interleaved_micros
    from esper.tezzeret.compile import compile_graph, sample_inputs
    from esper.tezzeret.validate import load_result_packages, train_step

    graph = validate_source({"template": {"name": name, "params": TEMPLATES[name]}})
    r = compile_graph(graph, target, CompileOptions(benchmarkBatches=BATCHES), workdir / name)
    packages = load_result_packages(r)
    module = r.module
    for p in module.parameters():
        p.requires_grad_(True)
    rows = []
    for batch in BATCHES:
        xs = sample_inputs(r.input_specs, batch, torch.device("cpu"), seed=batch)
        leaves = [x.detach().clone().requires_grad_(True) for x in xs]
        with torch.no_grad():
            out = module(*xs)
        gs = [torch.ones_like(o) for o in (out if isinstance(out, (tuple, list)) else (out,))]

        def eager_step(leaves: list[torch.Tensor] = leaves, gs: list[torch.Tensor] = gs) -> None:
            for t in (*module.parameters(), *leaves):
                t.grad = None
            o = module(*leaves)
            torch.autograd.backward(tuple(o) if isinstance(o, (tuple, list)) else (o,), gs)

        def compiled_step(xs: list[torch.Tensor] = xs, gs: list[torch.Tensor] = gs) -> None:
            train_step(r, packages, xs, gs)

        recorder = Products()
        with sdpa_kernel([SDPBackend.MATH]), recorder:
            eager_step()
        calls = recorder.calls

        # Each product timed on its own, repeated (median): its inputs hot in cache, as they may not be
        # in a step, so their sum is a floor under any step's products, and eager over it a ceiling.
        def replay(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return lambda: func(*args, **kwargs)

        fns = [eager_step, compiled_step, *(replay(*c) for c in calls)]
        rounds = [interleaved_micros(fns, budget_s=3.0) for _ in range(repeat)]
        eager, compiled, *each = (statistics.median(col) for col in zip(*rounds, strict=True))
        alone = sum(each)
        with FlopCounterMode(display=False) as counter:
            for func, args, kwargs in calls:
                func(*args, **kwargs)
        rows.append({"batch": batch, "eagerStep": round(eager, 1), "compiledStep": round(compiled, 1),
                     "products": round(alone, 1), "calls": len(calls), "ceiling": round(eager / alone, 3),
                     "speedup": round(eager / compiled, 3),
                     "gflops": round(counter.get_total_flops() / alone / 1e3, 1)})  # fmt: skip
    return rows


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from esper.tezzeret.bench import geomean

    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--target", default="cpu", choices=("cpu", "cpu-avx512"), help="the CPU target compiled for"
    )
    ap.add_argument("--repeat", type=int, default=3, help="rounds per batch (median taken)")
    args = ap.parse_args()
    malloc = allocation()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        rows = {name: measure(name, args.target, Path(tmp), args.repeat) for name in TEMPLATES}
    title = (f"Training step for {args.target}: eager / compiled / products alone (µs), batches {BATCHES}; "
             "ceiling = eager / products")  # fmt: skip
    table = Table(title=title)
    for c in (
        "template",
        "speedup",
        "ceiling",
        "reached",
        *[f"@{b}" for b in BATCHES],
        "products GFLOP/s @512",
    ):
        table.add_column(c)
    speedup = {n: geomean([r["speedup"] for r in per]) for n, per in rows.items()}
    ceiling = {n: geomean([r["ceiling"] for r in per]) for n, per in rows.items()}
    for name, per in rows.items():
        cells = [f"{r['eagerStep']:.0f} / {r['compiledStep']:.0f} / {r['products']:.0f}" for r in per]
        table.add_row(name, f"{speedup[name]:.2f}x", f"{ceiling[name]:.2f}x",
                      f"{speedup[name] / ceiling[name]:.0%}", *cells, f"{per[-1]['gflops']:.0f}")  # fmt: skip
    overall = {"speedup": geomean(list(speedup.values())), "ceiling": geomean(list(ceiling.values()))}
    table.add_row("geomean", f"{overall['speedup']:.2f}x", f"{overall['ceiling']:.2f}x",
                  f"{overall['speedup'] / overall['ceiling']:.0%}")  # fmt: skip
    Console(width=220).print(table)
    doc = {"torch": torch.__version__, "cpus": os.cpu_count(), "benchThreads": 1, "target": args.target,
           "repeat": args.repeat,
           "malloc": malloc,
           "templates": {n: {"speedup": round(speedup[n], 3), "ceiling": round(ceiling[n], 3), "batches": per}
                         for n, per in rows.items()},
           "geomeanSpeedup": round(overall["speedup"], 3),
           "geomeanCeiling": round(overall["ceiling"], 3)}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("compile_floor.json" if args.target == "cpu" else f"compile_floor-{args.target}.json")
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
