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

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from rich.progress import Progress, TaskID
    from torch import nn

    from esper.kasmina import KernelCatalog, PlateauPolicy

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
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
        }


# ---------------------------------------------------------------- 1. compile


def _load_blueprint(name: str, examples_dir: Path) -> tuple[str, dict[str, Any]]:
    """(label, spec) of an example Blueprint: the file if present, else the built-in copy."""
    import yaml

    path = examples_dir / name
    if path.is_file():
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        label = (doc.get("metadata") or {}).get("name") or path.stem
        return label, doc["spec"]
    if name not in FALLBACK_SPECS:
        raise DemoError(f"no blueprint {path}")
    return Path(name).stem, {**FALLBACK_SPECS[name], "targets": ["cpu"]}


def _planned_key(spec: dict[str, Any]) -> str | None:
    """The kernel key the compile Job will compute (no compile), or None if planning fails (the
    Job then reports the problem itself)."""
    try:
        from esper.tezzeret.entrypoint import plan

        return str(plan(spec, "cpu", None).key)
    except Exception:
        return None


def _compile_one(
    spec: dict[str, Any], store_dir: Path, jobs_dir: Path, label: str, on_line: Callable[[str], None]
) -> dict[str, Any]:
    """Run `python -m esper.tezzeret` for one Blueprint; its result JSON (or an error document).

    A subprocess, not an in-process call: it is the compile Job the operator runs, it keeps the
    compiler's threads, memory and logging out of the demo, and a crash costs one kernel only.
    """
    bp = jobs_dir / f"{label}.json"
    bp.write_text(json.dumps({"apiVersion": "esper.dev/v1alpha1", "kind": "Blueprint", "spec": spec}))
    result = jobs_dir / f"{label}.result.json"
    result.unlink(missing_ok=True)
    from esper.tezzeret.entrypoint import command

    cmd = command(bp, target="cpu", store=store_dir, result_path=result)
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.rstrip()
            tail = [*tail[-30:], line]
            if line.startswith("tezzeret "):
                on_line(line.split(" ", 3)[-1])  # drop "tezzeret <date> <time>"
        code = proc.wait()
    try:
        doc: dict[str, Any] = json.loads(result.read_text())
    except (OSError, ValueError):
        doc = {"error": {"code": code, "message": "\n".join(tail[-8:]) or f"exit {code}"}}
    if code and "error" not in doc:
        doc = {"error": {"code": code, "message": "\n".join(tail[-8:])}}
    return doc


def compile_kernels(
    names: Sequence[str],
    workdir: Path,
    console: Console,
    examples_dir: Path = EXAMPLES_DIR,
    store_dir: Path | None = None,
) -> list[KernelInfo]:
    """Compile each example into `store_dir` (default `<workdir>/store`; bundles already there are
    not rebuilt), then fetch and verify each bundle into `<workdir>/bundles/<key>` (what seeds load)."""
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from esper.storage import open_store

    store_dir = Path(store_dir) if store_dir is not None else workdir / "store"
    jobs_dir = workdir / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(str(store_dir))
    have = set(store.list_keys())
    infos: list[KernelInfo] = []
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[label]:<20}"),
        BarColumn(bar_width=20),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        tasks = {n: progress.add_task("queued", total=1, label=Path(n).stem, start=False) for n in names}
        for name in names:
            label, spec = _load_blueprint(name, examples_dir)
            tid = tasks[name]
            progress.start_task(tid)
            progress.update(tid, label=label)
            t = spec.get("template")
            info = KernelInfo(blueprint=label, template=t["name"] if t else "graph")
            key = _planned_key(spec)
            t0 = time.perf_counter()
            if key is not None and key in have:
                info.cached, info.key = True, key
                progress.update(tid, description="[dim]in the store: not recompiled", completed=1)
            else:
                progress.update(tid, description="compiling")
                doc = _compile_one(
                    spec,
                    store_dir,
                    jobs_dir,
                    label,
                    lambda msg, tid=tid: progress.update(tid, description=escape(msg[:60])),
                )
                if "error" in doc:
                    err = doc["error"]
                    info.error = f"exit {err.get('code')}: {str(err.get('message', ''))[:300]}"
                    progress.update(
                        tid, description=f"[red]failed ({err.get('reason', err.get('code'))})", completed=1
                    )
                else:
                    info.key, info.manifest_sha256 = doc["key"], doc["manifestSha256"]
                    info.compile_seconds = time.perf_counter() - t0
                    progress.update(
                        tid, description=f"[green]compiled in {info.compile_seconds:.0f}s", completed=1
                    )
            if info.key is not None:
                _fetch(store, info, workdir / "bundles")
            infos.append(info)
    return infos


def _fetch(store: Any, info: KernelInfo, bundles: Path) -> None:
    """Fetch the bundle, verified against the compile result's manifest sha256 (for a bundle that
    was already in the store, against the store's own manifest), and read its report."""
    from esper.artifact import read_manifest, sha256_bytes

    assert info.key is not None
    try:
        sha = info.manifest_sha256 or sha256_bytes(store.read_manifest_bytes(info.key))
        dest = store.fetch_bundle(info.key, bundles / info.key, sha)
        m = read_manifest(dest)
    except Exception as e:
        info.error = f"fetch failed: {type(e).__name__}: {e}"[:300]
        return
    info.manifest_sha256, info.bundle = sha, str(dest)
    info.params = sum(math.prod(p.shape) for p in m.params)
    info.graph, info.init_seed = m.graph, m.options.initSeed
    if m.report is not None:
        info.speedup, info.train_speedup = m.report.speedup, m.report.trainSpeedup


def kernel_table(kernels: Sequence[KernelInfo]) -> Any:
    from rich.table import Table

    t = Table(title="Kernels (compiled by Tezzeret, cpu)")
    for col in ("blueprint", "template", "key", "params", "speedup", "trainSpeedup", "compile"):
        t.add_column(
            col, justify="right" if col in ("params", "speedup", "trainSpeedup", "compile") else "left"
        )
    for k in kernels:
        if k.error:
            t.add_row(
                k.blueprint, k.template, k.key[:16] if k.key else "-", "-", "-", "-", f"[red]{k.error[:60]}"
            )
            continue
        t.add_row(
            k.blueprint,
            k.template,
            (k.key or "")[:16],
            f"{k.params:,}",
            _x(k.speedup),
            _x(k.train_speedup),
            "cached" if k.cached else f"{k.compile_seconds:.0f}s",
        )
    return t


def _x(v: float | None) -> str:
    return "-" if v is None else f"x{v:.2f}"


# ---------------------------------------------------------------- 2. train


@dataclass
class Task:
    """A fixed regression task: x ~ N(0, 1) in R^d_in, y = teacher(x) standardised per output."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def make_task(cfg: DemoConfig) -> Task:
    """Data from a random tanh teacher (2 hidden layers of `teacher_width`): smooth, learnable, and
    too rich for one hidden layer of width 64, so the host plateaus well above what depth reaches."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(cfg.seed + 1000)
    w = cfg.teacher_width
    teacher = nn.Sequential(
        nn.Linear(cfg.d_in, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, cfg.d_out)
    )
    with torch.no_grad():
        for m in teacher:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, cfg.teacher_gain / m.in_features**0.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
        x = torch.randn(cfg.n_train + cfg.n_val, cfg.d_in, generator=gen)
        y = teacher(x)
        y = (y - y[: cfg.n_train].mean(0)) / y[: cfg.n_train].std(0)
    n = cfg.n_train
    return Task(x[:n], y[:n], x[n:], y[n:])


def _host_class() -> type[nn.Module]:
    from torch import nn

    class Host(nn.Module):
        """Linear(d_in, width) -> GELU -> blocks (identities: the seed slots) -> Linear(width, d_out)."""

        def __init__(self, cfg: DemoConfig, n_points: int) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Linear(cfg.d_in, cfg.width), nn.GELU())
            self.blocks = nn.ModuleList(nn.Identity() for _ in range(n_points))
            self.head = nn.Linear(cfg.width, cfg.d_out)

        def forward(self, x: Any) -> Any:
            h = self.stem(x)
            for b in self.blocks:
                h = b(h)
            return self.head(h)

    return Host


def build_host(cfg: DemoConfig, n_points: int) -> nn.Module:
    import torch

    torch.manual_seed(cfg.seed)  # the same host initialisation in every run
    return _host_class()(cfg, n_points)


def build_large(cfg: DemoConfig, kernels: Sequence[KernelInfo]) -> nn.Module:
    """The host with each kernel's graph in eager in its own block, initialised from the bundle.

    The block is the graph module itself, `g(y)`: what a fossilized seed computes at its slot (the
    slot's output is the seed's output; residual templates include the skip `y + f(y)` themselves).
    """
    from safetensors.torch import load_file

    from esper.artifact import PARAMS
    from esper.blueprint import Graph, build_module

    model = build_host(cfg, len(kernels))
    for i, k in enumerate(kernels):
        assert k.graph is not None and k.bundle is not None
        g = build_module(Graph.model_validate(k.graph), seed=k.init_seed)
        g.load_state_dict(load_file(str(Path(k.bundle) / PARAMS)))
        model.blocks[i] = g  # type: ignore[index]
    return model


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int) -> float:
    import torch

    was = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            out = model(x[i : i + chunk])
            total += float(torch.nn.functional.mse_loss(out, y[i : i + chunk], reduction="sum"))
    model.train(was)
    return total / y.numel()


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train(
    name: str,
    model: nn.Module,
    task: Task,
    cfg: DemoConfig,
    progress: Progress,
    tid: TaskID,
    policy_factory: Callable[[nn.Module, torch.optim.Optimizer, Callable[[], float]], PlateauPolicy]
    | None = None,
    on_step: Callable[[PlateauPolicy], None] | None = None,
) -> RunResult:
    """Adam on MSE, `cfg.steps` steps; batches from one fixed-seed generator, so every run sees the
    same data in the same order. With a policy: the Kasmina trainer protocol (policy.step() after
    optimizer.step(), policy.on_eval() every `eval_every` steps)."""
    import torch

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    params_start = _n_params(model)

    def evaluate() -> float:
        return _evaluate(model, task.x_val, task.y_val, cfg.eval_batch)

    policy = policy_factory(model, opt, evaluate) if policy_factory else None
    curve = [(0, evaluate())]
    model.train()
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, len(task.x_train), (cfg.batch,), generator=gen)
        loss = torch.nn.functional.mse_loss(model(task.x_train[idx]), task.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if policy is not None:
            policy.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            v = evaluate()
            curve.append((step, v))
            if policy is not None:
                policy.on_eval(v, step)
            progress.update(tid, completed=step, description=f"val {v:.4f}")
        if policy is not None and on_step is not None:
            on_step(policy)
    wall = time.perf_counter() - t0
    n_fit = min(len(task.x_train), cfg.n_val)  # train loss on a fixed slice, same size as val
    train_loss = _evaluate(model, task.x_train[:n_fit], task.y_train[:n_fit], cfg.eval_batch)
    return RunResult(
        name=name,
        params=_n_params(model),
        train_loss=train_loss,
        val_loss=curve[-1][1],
        best_val_loss=min(v for _, v in curve),
        wall_seconds=wall,
        steps=cfg.steps,
        curve=curve,
        params_start=params_start,
    )


def grow(
    cfg: DemoConfig, kernels: Sequence[KernelInfo], task: Task, progress: Progress, tid: TaskID
) -> tuple[RunResult, list[dict[str, Any]]]:
    """The grown run: host + one slot per kernel, PlateauPolicy over a catalog of the bundles.

    Each kernel is grown at most once (the catalog drops a kernel once germinated), so every
    compiled Blueprint gets its turn, in the examples' order, instead of the top-ranked one
    filling every slot.
    """
    from esper.kasmina import CatalogEntry, KasminaMetrics, KernelCatalog, slots, wrap

    names = {k.key: k.blueprint for k in kernels}
    # Scores follow the examples' order, not the reports' speedups: those are measured at compile
    # time on a noisy machine and would reorder the kernels (and change the demo) from one fresh
    # compile to the next. The bundle is verified against the compile result's sha256 on load.
    entries = [
        CatalogEntry(k.key, Path(k.bundle), score=float(len(kernels) - i), sha256=k.manifest_sha256)
        for i, k in enumerate(kernels)
        if k.key and k.bundle
    ]
    catalog = KernelCatalog(entries)
    model = build_host(cfg, len(kernels))
    from prometheus_client import CollectorRegistry

    metrics = KasminaMetrics(CollectorRegistry())  # not the process-wide registry: runs are repeatable
    wrap(model, [f"blocks.{i}" for i in range(len(kernels))], blend_steps=cfg.blend_steps, metrics=metrics)
    seen = 0
    used: set[str] = set()

    made: list[PlateauPolicy] = []

    def make_policy(m: nn.Module, opt: torch.optim.Optimizer, evaluate: Callable[[], float]) -> PlateauPolicy:
        made.append(cfg.policy(catalog, evaluate, m, opt))
        return made[0]

    def on_step(policy: PlateauPolicy) -> None:
        nonlocal seen
        for ev in policy.events[seen:]:
            if ev.get("kernel"):
                ev["blueprint"] = names.get(ev["kernel"])
            if ev["event"] == "germinate":
                slot = policy.slots[ev["slot"]]
                ev["loadSeconds"] = slot.telemetry.load_seconds
                ev["seedParams"] = sum(p.numel() for p in slot.seed_parameters())
                ev["compiled"] = type(slot.seed).__name__ == "KernelModule"
                used.add(ev["kernel"])
                policy.catalog = KernelCatalog(e for e in entries if e.key not in used)
        seen = len(policy.events)

    result = train("grown", model, task, cfg, progress, tid, make_policy, on_step)
    on_step(made[0])
    result.note = ", ".join(f"{n}: {s.state.value}" for n, s in slots(model).items())
    return result, made[0].events


# ---------------------------------------------------------------- 3. report


def results_table(runs: dict[str, RunResult]) -> Any:
    from rich.table import Table

    t = Table(title="Training runs (same data, same steps)")
    for col in ("run", "params", "train loss", "val loss", "best val", "wall", "steps"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for r in runs.values():
        params = f"{r.params:,}" if r.params == r.params_start else f"{r.params_start:,} -> {r.params:,}"
        t.add_row(
            r.name,
            params,
            f"{r.train_loss:.4f}",
            f"{r.val_loss:.4f}",
            f"{r.best_val_loss:.4f}",
            f"{r.wall_seconds:.1f}s",
            str(r.steps),
        )
    return t


def events_table(events: Sequence[dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(title="Seed events (grown run)")
    for col in ("step", "slot", "event", "kernel", "contribution", "detail"):
        t.add_column(col, justify="right" if col in ("step", "contribution") else "left")
    for e in events:
        kernel = f"{e['kernel'][:12]} ({e.get('blueprint')})" if e.get("kernel") else "-"
        c = e.get("contribution")
        detail = ""
        if e["event"] == "germinate" and e.get("loadSeconds") is not None:
            detail = f"loaded in {e['loadSeconds'] * 1000:.0f} ms, {e.get('seedParams', 0):,} params"
        elif e["event"] == "plateau":
            detail = f"val {e['valLoss']:.4f}, best {e['best']:.4f}"
        elif e.get("valLoss") is not None:
            detail = f"val {e['valLoss']:.4f}"
        elif e.get("reason"):
            detail = str(e["reason"])[:60]
        t.add_row(
            str(e["step"]),
            e.get("slot") or "-",
            e["event"],
            kernel,
            "-" if c is None else f"{c:+.4f}",
            detail,
        )
    return t


def plot(runs: dict[str, RunResult], events: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Validation loss vs step for the three runs, seed events as vertical lines (None without
    matplotlib, the `demo` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colors = {"host": "tab:gray", "grown": "tab:green", "large": "tab:purple"}
    labels = {"host": "host alone", "grown": "grown (compiled seeds)", "large": "large from scratch"}
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for name, r in runs.items():
        steps, vals = zip(*r.curve, strict=True)
        ax.plot(
            steps, vals, color=colors.get(name), label=f"{labels.get(name, name)} ({r.val_loss:.4f})", lw=1.8
        )
    marked: set[str] = set()
    for e in events:
        style = EVENT_STYLE.get(e["event"])
        if style is None:
            continue
        color, ls = style
        ax.axvline(
            e["step"], color=color, ls=ls, lw=1, alpha=0.8, label=None if e["event"] in marked else e["event"]
        )
        marked.add(e["event"])
    # Zoom on the plateau: the first steps (loss ~1-5) would flatten every difference that matters.
    late = [v for r in runs.values() for s, v in r.curve if s >= r.steps // 10]
    if late:
        ax.set_ylim(0.95 * min(late), 1.15 * max(late))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation MSE")
    ax.set_title("Esper demo: growing a narrow host with compiled kernels")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the demo


def run_demo(
    workdir: Path,
    *,
    quick: bool = False,
    console: Console | None = None,
    docs_png: Path | None = None,
    config: DemoConfig | None = None,
    examples_dir: Path = EXAMPLES_DIR,
    store: Path | None = None,
) -> DemoResult:
    """Compile the examples, train host / grown / large, print tables, write the PNG and the JSON.

    `store`: the kernel store directory (default `<workdir>/store`; e.g. the CLI's .esper/store).
    `docs_png`: also copy the PNG there (e.g. docs/demo-loss.png). `config` overrides the defaults
    (`quick` picks DemoConfig.quick()). Raises DemoError if no kernel could be compiled.
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
    )
    json_path.write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    console.print(
        f"wrote {json_path}"
        + (f" and {png}" if png else " (no PNG: matplotlib is not installed)")
        + (f"; copied to {docs_png}" if png and docs_png else "")
    )
    return result
