"""Step 2 of the demo: the task, the three models and their training loops."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch
    from rich.progress import Progress, TaskID
    from torch import nn

    from esper.kasmina import PlateauPolicy


from esper.demo.config import DemoConfig, KernelInfo, RunResult

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
        cast("nn.ModuleList", model.blocks)[i] = g
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


def record_events(
    policy: PlateauPolicy, seen: int, names: Mapping[Any, str], entries: Sequence[Any], used: set[str]
) -> int:
    """Annotate the policy's events since `seen` for the report (Blueprint name, load time, seed size,
    compiled or not) and drop each germinated kernel from the catalog; returns the new `seen`."""
    from esper.kasmina import KernelCatalog

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
    return len(policy.events)


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
        seen = record_events(policy, seen, names, entries, used)

    result = train("grown", model, task, cfg, progress, tid, make_policy, on_step)
    on_step(made[0])
    result.note = ", ".join(f"{n}: {s.state.value}" for n, s in slots(model).items())
    return result, made[0].events
