"""Step 3 of the demo: tables and the loss-curve picture."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


from esper.demo.config import EVENT_STYLE, RunResult

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
