"""`esper demo`: grow a model with real compiled kernels, on one CPU, in a few minutes.

1. Compile the width-64 example Blueprints with Tezzeret (the compile Job, one subprocess each,
   exactly as the operator runs it) into `<workdir>/store`; bundles already there are not rebuilt.
2. Train three models on the same synthetic regression task (a random teacher MLP), same data order
   and step budget:

   - ``host``: a deliberately narrow host, Linear(32->64) -> GELU -> [4 seed slots] -> Linear(64->8);
   - ``grown``: the same host whose slots a PlateauPolicy fills with the compiled kernels (AOTInductor
     forward and backward, loaded with `load_kernel` from bundles fetched from the store and verified)
     when validation loss plateaus: each seed trains in isolation, blends in, and is fossilized or
     culled by its measured contribution;
   - ``large``: the reference, the same host with every catalog graph built in eager
     (`esper.blueprint.build_module`, initialised from the bundle's params) in the same slots from
     step 0, each block being the graph itself (``g(y)``, exactly what a fossilized seed computes:
     the residual templates carry their own skip): the capacity growth could add, trained from
     scratch.

3. Print the tables, write `<workdir>/demo-loss.png` (validation curves, seed events marked) and
   `<workdir>/demo.json` (every number).

The CLI calls `run_demo(workdir, quick=..., console=...)`; tests call it with `quick=True` (fewer steps,
one kernel).
"""

from esper.demo.compile import compile_kernels, kernel_table
from esper.demo.config import (
    EXAMPLES_DIR,
    QUICK_EXAMPLES,
    WIDTH64_EXAMPLES,
    DemoConfig,
    DemoError,
    DemoResult,
    KernelInfo,
    RunResult,
)
from esper.demo.run import run_demo
from esper.demo.train import Task, build_host, build_large, grow, make_task, train

__all__ = [
    "EXAMPLES_DIR",
    "QUICK_EXAMPLES",
    "WIDTH64_EXAMPLES",
    "DemoConfig",
    "DemoError",
    "DemoResult",
    "KernelInfo",
    "RunResult",
    "Task",
    "build_host",
    "build_large",
    "compile_kernels",
    "grow",
    "kernel_table",
    "make_task",
    "run_demo",
    "train",
]
