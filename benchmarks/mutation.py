"""Mutation testing of the core modules with mutmut: killed, survived and timed out, per module.

    python benchmarks/mutation.py [MODULE ...] [--report-only] [--all] [--max-children N]

MODULE is a dotted module name (`esper.artifact`, `esper_operator.jobs`); default: every core module,
one after the other. mutmut (configured in pyproject.toml's [tool.mutmut]) runs in a staged copy of
the tree, `.esper/mutation/`, where the operator package sits beside `esper` so that module names
match file paths. Its `mutants/` directory stays there between runs, so an unchanged function keeps
its verdicts: a run tries again only the mutants not yet killed (`--all`: every one). The tests are
the fast unit tests (`tests/unit -m "not slow"`); for each mutant mutmut runs only the tests that
call the mutated function.

Mutants that cannot change behaviour are listed with the reason in tests/mutation-equivalents.toml
and counted apart. The score is killed / (killed + survived + timeout + no tests), equivalents
excluded; a timeout is not counted as a kill.

Prints a table and writes benchmarks/results/mutation.json (per module: counts, score, the surviving
mutants with their diffs). Slow on a small machine: run it under `nice`, one module at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / ".esper" / "mutation"
RESULTS = REPO / "benchmarks" / "results"
EQUIVALENTS = REPO / "tests" / "mutation-equivalents.toml"

#: The core modules, in the order they are run (dotted name in the staged tree -> path in the repo).
CORE: dict[str, str] = {
    "esper.artifact": "esper/artifact.py",
    "esper.kasmina.lifecycle": "esper/kasmina/lifecycle.py",
    "esper.storage.base": "esper/storage/base.py",
    "esper.storage.local": "esper/storage/local.py",
    "esper.blueprint.validate": "esper/blueprint/validate.py",
    "esper.kasmina.policy": "esper/kasmina/policy.py",
    "esper.kasmina.seed": "esper/kasmina/seed.py",
    "esper.sidecar.sync": "esper/sidecar/sync.py",
    "esper_operator.jobs": "operator/esper_operator/jobs.py",
    "esper_operator.status": "operator/esper_operator/status.py",
    "esper_operator.reconcile": "operator/esper_operator/reconcile.py",
}
# What the tests need besides the packages (tests read crds/, charts/, examples/ through their paths).
TREES = {"esper": "esper", "esper_operator": "operator/esper_operator", "tests": "tests"}
FILES = ("pyproject.toml",)
ALSO = ("crds", "charts", "examples", "docs", "README.md", "Makefile")  # linked beside the sources
COUNTED = ("killed", "survived", "timeout", "no tests")


def existing_modules() -> dict[str, str]:
    """The core modules this checkout has."""
    return {name: path for name, path in CORE.items() if (REPO / path).is_file()}


def stage() -> set[Path]:
    """Mirror the sources and tests into STAGE, keeping its mutants/ (mutmut's cache) in place;
    returns the staged paths that changed.

    Files whose content is unchanged keep their mtime, so mutmut regenerates only what changed.
    """
    changed: set[Path] = set()
    STAGE.mkdir(parents=True, exist_ok=True)
    wanted: dict[Path, Path] = {Path(name): REPO / name for name in FILES}  # staged -> repo path
    for dst, src in TREES.items():
        for path in (REPO / src).rglob("*"):
            if "__pycache__" not in path.parts and path.is_file():
                wanted[Path(dst) / path.relative_to(REPO / src)] = path
    for rel, src_path in sorted(wanted.items()):
        dst_path = STAGE / rel
        if not dst_path.is_file() or dst_path.read_bytes() != src_path.read_bytes():
            dst_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src_path, dst_path)
            changed.add(rel)
    for top in TREES:  # drop files that are gone from the repo
        for path in sorted((STAGE / top).rglob("*"), reverse=True):
            rel = path.relative_to(STAGE)
            if path.is_file() and rel not in wanted and "__pycache__" not in path.parts:
                path.unlink()
    for name in ALSO:
        link = STAGE / name
        if link.is_symlink() and link.readlink() != REPO / name:  # a cache moved from another checkout
            link.unlink()
        if not link.exists():
            link.symlink_to(REPO / name)
    _drop_stale_mutant_tests()
    return changed


def _drop_stale_mutant_tests() -> None:
    """Remove test files that mutmut copied into STAGE/mutants and the repo no longer has: mutmut
    updates its copies but never deletes one, and pytest would still collect it."""
    tests, copies = REPO / "tests", STAGE / "mutants" / "tests"
    if not copies.is_dir():
        return
    for path in sorted(copies.rglob("*"), reverse=True):
        stale = not (tests / path.relative_to(copies)).exists()
        if stale and path.is_file() and "__pycache__" not in path.parts:
            path.unlink()


def pending(module: str) -> list[str] | None:
    """The module's mutants to run: all but those already killed or listed as equivalent (a changed
    function has no verdict again, so it is included). None before mutmut has generated the
    module's mutants: run them all."""
    statuses = _statuses(module.replace(".", "/") + ".py")
    if not statuses:
        return None
    done = ("killed", "caught by type check")
    equivalent = load_equivalents()  # cannot be killed: rerunning them would only cost time
    return sorted(n for n, status in statuses.items() if status not in done and n not in equivalent)


def run_mutmut(module: str, max_children: int, everything: bool) -> int:
    """`mutmut run` on one module's mutants in the staged tree; the tests import only staged copies.

    mutmut reruns every mutant named on its command line, so only those without a kill are named;
    a glob names the whole module (with `everything`, or when its source changed: its mutants are
    regenerated, under names the last results may not have).
    """
    todo = None if everything else pending(module)
    if todo == []:
        print(f"{module}: every mutant is killed; nothing to run")
        return 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(STAGE / "mutants")
    mutmut = Path(sys.executable).with_name("mutmut")
    names = todo if todo is not None else [f"{module}.*"]
    cmd = ["nice", "-n", "19", str(mutmut), "run", "--max-children", str(max_children), *names]
    print(f"$ mutmut run --max-children {max_children} <{len(names)} mutant(s) of {module}>", flush=True)
    return subprocess.call(cmd, cwd=STAGE, env=env)


def load_equivalents() -> dict[str, str]:
    """Mutant name -> why it cannot change behaviour (tests/mutation-equivalents.toml)."""
    if not EQUIVALENTS.is_file():
        return {}
    doc = tomllib.loads(EQUIVALENTS.read_text())
    return {name: str(entry["reason"]) for name, entry in doc.get("mutant", {}).items()}


def _statuses(path: str) -> dict[str, str]:
    """Mutant name -> mutmut's verdict for one staged source file, from mutants/<path>.meta."""
    from mutmut.stats import status_by_exit_code

    meta = STAGE / "mutants" / (path + ".meta")
    if not meta.is_file():
        return {}
    codes: dict[str, int | None] = json.loads(meta.read_text()).get("exit_code_by_key", {})
    return {name: status_by_exit_code[code] for name, code in codes.items()}


def _diff(name: str, path: str) -> str:
    """The mutant as a unified diff (mutmut's own rendering), for the report."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    cwd = Path.cwd()
    os.chdir(STAGE)
    try:
        return get_diff_for_mutant(name, path=path)
    except Exception as e:  # the report must not die on one unreadable mutant
        return f"(no diff: {e})"
    finally:
        os.chdir(cwd)


def report(modules: dict[str, str]) -> dict[str, Any]:
    """Counts, score and survivors per module, equivalents taken out."""
    equivalents = load_equivalents()
    out: dict[str, Any] = {"modules": {}, "equivalents": equivalents}
    total: Counter[str] = Counter()
    for module, repo_path in modules.items():
        staged = module.replace(".", "/") + ".py"
        statuses = _statuses(staged)
        if not statuses:
            continue
        counts: Counter[str] = Counter()
        survivors = []
        for name, status in sorted(statuses.items()):
            if name in equivalents:
                counts["equivalent"] += 1
                continue
            counts[status] += 1
            if status in ("survived", "timeout", "no tests", "suspicious"):
                survivors.append({"mutant": name, "status": status, "diff": _diff(name, staged)})
        denominator = sum(counts[s] for s in COUNTED)
        score = counts["killed"] / denominator if denominator else None
        out["modules"][module] = {
            "path": repo_path,
            "mutants": len(statuses),
            **{s: counts[s] for s in (*COUNTED, "equivalent", "not checked", "suspicious")},
            "score": None if score is None else round(score, 4),
            "survivors": survivors,
        }
        total.update(counts)
    denominator = sum(total[s] for s in COUNTED)
    out["total"] = {
        **{s: total[s] for s in (*COUNTED, "equivalent", "not checked", "suspicious")},
        "score": round(total["killed"] / denominator, 4) if denominator else None,
    }
    stale = sorted(set(equivalents) - {n for m in modules for n in _statuses(m.replace(".", "/") + ".py")})
    out["stale_equivalents"] = stale  # listed, but no such mutant any more: review the list
    return out


def print_table(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mutation testing (mutmut, tests/unit -m 'not slow')")
    counts = ("killed", "survived", "timeout", "no tests", "equivalent", "not run")
    for col in ("module", "mutants", *counts, "score"):
        table.add_column(col, justify="left" if col == "module" else "right", no_wrap=True)

    def row(name: str, m: dict[str, Any], mutants: int | str) -> None:
        score = "-" if m["score"] is None else f"{100 * m['score']:.1f}%"
        cells = [str(m[k]) for k in (*COUNTED, "equivalent", "not checked")]
        table.add_row(name, str(mutants), *cells, score)

    for name, m in doc["modules"].items():
        row(name, m, m["mutants"])
    row("total", doc["total"], sum(m["mutants"] for m in doc["modules"].values()))
    console = Console(width=140)
    console.print(table)
    for m in doc["modules"].values():
        for s in m["survivors"]:
            console.print(f"[bold]{s['status']}[/bold] {s['mutant']}")
    if doc["stale_equivalents"]:
        console.print(f"listed as equivalent but gone: {', '.join(doc['stale_equivalents'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="dotted module names (default: every core module)")
    parser.add_argument("--report-only", action="store_true", help="report the last results, run nothing")
    parser.add_argument("--max-children", type=int, default=2, help="parallel test processes (default 2)")
    parser.add_argument("--all", action="store_true", help="rerun every mutant, killed ones too")
    args = parser.parse_args(argv)
    available = existing_modules()
    unknown = [m for m in args.modules if m not in available]
    if unknown:
        parser.error(f"not a core module: {', '.join(unknown)} (choose from {', '.join(available)})")
    selected = {m: available[m] for m in args.modules} if args.modules else available
    t0 = time.monotonic()
    if not args.report_only:
        changed = stage()
        for module in selected:
            rerun = args.all or Path(module.replace(".", "/") + ".py") in changed
            rc = run_mutmut(module, args.max_children, rerun)
            if rc != 0:
                print(f"mutmut failed on {module} (exit {rc})", file=sys.stderr)
                return rc
    doc = report(available)
    doc["seconds"] = round(time.monotonic() - t0, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mutation.json").write_text(json.dumps(doc, indent=2) + "\n")
    print_table(doc)
    print(f"wrote {RESULTS / 'mutation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
