"""Step 1 of the demo: compile the example Blueprints with the compile Job's command line."""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


from esper.contracts.common import GROUP_VERSION
from esper.contracts.job import CompileFailure, CompileResult, read_result
from esper.demo.config import EXAMPLES_DIR, FALLBACK_SPECS, DemoError, KernelInfo

# ---------------------------------------------------------------- 1. compile


def _load_blueprint(name: str, examples_dir: Path) -> tuple[str, dict[str, Any]]:
    """(label, spec) of an example Blueprint: the file if present, else the built-in copy."""
    from esper.contracts.manifest import ManifestError, load_one

    path = examples_dir / name
    if path.is_file():
        try:
            doc = load_one(path.read_bytes())
        except ManifestError as exc:
            raise DemoError(f"{path}: {exc}") from None
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
) -> CompileResult | CompileFailure:
    """Run `python -m esper.tezzeret` for one Blueprint; its result (or the failure, with the log's tail).

    A subprocess, not an in-process call: it is the compile Job the operator runs, it keeps the
    compiler's threads, memory and logging out of the demo, and a crash costs one kernel only.
    """
    bp = jobs_dir / f"{label}.json"
    bp.write_text(json.dumps({"apiVersion": GROUP_VERSION, "kind": "Blueprint", "spec": spec}))
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
    outcome = read_result(result, code)
    if isinstance(outcome, CompileFailure) and outcome.error.reason in ("NoResult", "BadResult"):
        outcome.error.message = "\n".join(tail[-8:]) or outcome.error.message
    return outcome


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
    from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

    from esper.storage import open_store

    store_dir = Path(store_dir) if store_dir is not None else workdir / "store"
    jobs_dir = workdir / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(str(store_dir))
    have = set(store.list_keys())  # a bundle here that the local key did not sign is recompiled
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
            if key is not None and key in have and _signed(store, key):
                info.cached, info.key = True, key
                progress.update(tid, description="[dim]in the store: not recompiled", completed=1)
            else:
                progress.update(tid, description="compiling")

                def on_line(msg: str, tid: TaskID = tid) -> None:
                    progress.update(tid, description=escape(msg[:60]))

                doc = _compile_one(spec, store_dir, jobs_dir, label, on_line)
                if isinstance(doc, CompileFailure):
                    err = doc.error
                    info.error = f"exit {err.code}: {err.message[:300]}"
                    progress.update(tid, description=f"[red]failed ({err.reason})", completed=1)
                else:
                    info.key, info.manifest_sha256 = doc.key, doc.manifestSha256
                    info.compile_seconds = time.perf_counter() - t0
                    progress.update(
                        tid, description=f"[green]compiled in {info.compile_seconds:.0f}s", completed=1
                    )
            if info.key is not None:
                _fetch(store, info, workdir / "bundles")
            infos.append(info)
    return infos


def _signed(store: Any, key: str) -> bool:
    """Whether the stored bundle's signature holds for the local trusted keys (the compile process
    signs with the local key pair); an older unsigned bundle is recompiled and replaced."""
    from esper.signing import SignatureError, TrustedKeys

    try:
        TrustedKeys.from_env().verify(store.read_manifest_bytes(key), store.read_signature_bytes(key))
    except SignatureError:
        return False
    return True


def _fetch(store: Any, info: KernelInfo, bundles: Path) -> None:
    """Fetch the bundle, verified against the compile result's manifest sha256 (for a bundle that
    was already in the store, against the store's own manifest), and read its report."""
    from esper.artifact import read_manifest, sha256_bytes
    from esper.signing import TrustedKeys

    assert info.key is not None
    try:
        sha = info.manifest_sha256 or sha256_bytes(store.read_manifest_bytes(info.key))
        dest = store.fetch_bundle(info.key, bundles / info.key, sha, trusted=TrustedKeys.from_env())
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
