"""The demo's knobs, constants and result records."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from esper.kasmina import KernelCatalog, PlateauPolicy


EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
#: The example Blueprints whose seeds take [batch, 64] -> [batch, 64] (attention-block is 8x32).
WIDTH64_EXAMPLES = ("transformer-mlp.yaml", "blueprint.yaml", "graph-blueprint.yaml", "lora-adapter.yaml")
QUICK_EXAMPLES = ("transformer-mlp.yaml",)
#: Used when the examples directory is not next to the package (a non-editable install).
FALLBACK_SPECS: dict[str, dict[str, Any]] = {
    "transformer-mlp.yaml": {
        "template": {"name": "transformer-mlp", "params": {"features": 64, "hidden": 128}}
    },
    "blueprint.yaml": {
        "template": {"name": "residual-mlp", "params": {"features": 64, "hidden": 128, "blocks": 2}},
        "compile": {"maxBatch": 1024, "initSeed": 0},
    },
    "graph-blueprint.yaml": {
        "graph": {
            "dtype": "float32",
            "inputs": [{"name": "x", "shape": ["batch", 64]}],
            "nodes": [
                {"id": "norm", "op": "rms_norm", "inputs": ["x"]},
                {"id": "value", "op": "linear", "inputs": ["norm"], "params": {"outFeatures": 64}},
                {"id": "gate_fc", "op": "linear", "inputs": ["norm"], "params": {"outFeatures": 64}},
                {"id": "gate", "op": "sigmoid", "inputs": ["gate_fc"]},
                {"id": "gated", "op": "mul", "inputs": ["value", "gate"]},
                {"id": "out", "op": "add", "inputs": ["x", "gated"]},
            ],
            "outputs": ["out"],
        }
    },
    "lora-adapter.yaml": {"template": {"name": "lora-adapter", "params": {"features": 64, "rank": 8}}},
}
RUNS = ("host", "grown", "large")
EVENT_STYLE = {
    "germinate": ("tab:green", "--"),
    "blending": ("tab:orange", ":"),
    "fossilize": ("tab:blue", "-"),
    "cull": ("tab:red", "-."),
}


class DemoError(RuntimeError):
    """The demo cannot go on (no kernel compiled); the message says why."""


@dataclass(frozen=True)
class DemoConfig:
    """Every knob of the demo; the defaults are tuned so the host plateaus early and the demo fits
    in a few minutes on 2 CPU cores (see docs/kasmina.md for the numbers they give)."""

    seed: int = 0
    d_in: int = 32
    width: int = 64
    d_out: int = 8
    teacher_width: int = 256
    teacher_gain: float = 2.0  # weight scale of the teacher: high enough that width 64 is not enough
    n_train: int = 65536
    n_val: int = 4096
    batch: int = 256
    steps: int = 4000
    lr: float = 2e-3
    seed_lr: float = 2e-3
    eval_every: int = 50
    eval_batch: int = 1024  # <= the kernels' compiled maxBatch
    patience: int = 4
    min_delta: float = 2e-3
    train_steps: int = 150
    blend_steps: int = 150
    cull_threshold: float = 0.0
    threads: int = 1  # small matrices: one thread is fastest and least noisy on a shared machine
    examples: tuple[str, ...] = WIDTH64_EXAMPLES

    def policy(
        self, catalog: KernelCatalog, evaluate: Callable[[], float], model: nn.Module, optimizer: Any
    ) -> PlateauPolicy:
        """The plateau policy with this config's knobs (the demo's and the in-pod trainer's)."""
        from esper.kasmina import PlateauPolicy

        return PlateauPolicy(
            patience=self.patience,
            min_delta=self.min_delta,
            train_steps=self.train_steps,
            blend_steps=self.blend_steps,
            cull_threshold=self.cull_threshold,
            catalog=catalog,
            evaluate=evaluate,
            model=model,
            optimizer=optimizer,
            group_options={"lr": self.seed_lr},
        )

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(
            n_train=16384,
            n_val=2048,
            steps=1600,
            patience=3,
            train_steps=100,
            blend_steps=100,
            examples=QUICK_EXAMPLES,
        )


@dataclass
class KernelInfo:
    """One compiled Blueprint: where its bundle is and what its report says."""

    blueprint: str
    template: str
    key: str | None = None
    manifest_sha256: str | None = None
    params: int = 0
    speedup: float | None = None
    train_speedup: float | None = None
    compile_seconds: float | None = None
    cached: bool = False
    error: str | None = None
    bundle: str | None = None  # the verified local copy the seeds load
    graph: dict[str, Any] | None = field(default=None, repr=False)
    init_seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"blueprint": self.blueprint, "template": self.template, "key": self.key,
                "manifestSha256": self.manifest_sha256, "params": self.params, "speedup": self.speedup,
                "trainSpeedup": self.train_speedup, "compileSeconds": self.compile_seconds,
                "cached": self.cached, "error": self.error, "bundle": self.bundle}  # fmt: skip


@dataclass
class RunResult:
    """One training run's numbers and curves."""

    name: str
    params: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    wall_seconds: float
    steps: int
    curve: list[tuple[int, float]]  # (step, validation loss), step 0 included
    params_start: int = 0
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params, "paramsStart": self.params_start,
                "trainLoss": self.train_loss, "valLoss": self.val_loss, "bestValLoss": self.best_val_loss,
                "wallSeconds": round(self.wall_seconds, 3), "steps": self.steps, "note": self.note,
                "curve": [[s, v] for s, v in self.curve]}  # fmt: skip


@dataclass
class DemoResult:
    """What `run_demo` did: kernels, runs, seed events, file paths, timings."""

    workdir: Path
    kernels: list[KernelInfo]
    runs: dict[str, RunResult]
    events: list[dict[str, Any]]
    config: DemoConfig
    warmup_seconds: float
    compile_seconds: float
    total_seconds: float
    png: Path | None
    json_path: Path
    distributed: dict[str, Any] | None = None  # `workers` > 1: the data-parallel run's checks and events

    def to_json(self) -> dict[str, Any]:
        import torch

        return {
            "config": asdict(self.config),
            "kernels": [k.to_json() for k in self.kernels],
            "runs": {n: r.to_json() for n, r in self.runs.items()},
            "events": self.events,
            "warmupSeconds": self.warmup_seconds,
            "compileSeconds": self.compile_seconds,
            "totalSeconds": self.total_seconds,
            "torch": torch.__version__,
            "threads": self.config.threads,
            "cpuCount": os.cpu_count(),
            "png": str(self.png) if self.png else None,
            "distributed": self.distributed,
        }
