"""Line coverage per package from the `.coverage` file pytest-cov leaves; `make test` prints it at the end.

Per package rather than per file, so gaps show at a glance; `python -m coverage report -m` has the
lines. Code that runs only in child processes (the operator under `kopf run`, compile Jobs started by the
test kubelet) is not measured here: those packages read low for that reason, not for lack of tests.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import coverage

ROOT = Path(__file__).resolve().parents[1]


def package_of(path: Path) -> str:
    rel = path.resolve().relative_to(ROOT)
    parts = rel.with_suffix("").parts
    if parts[0] == "operator":
        parts = parts[1:]
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0] + " (modules)" if len(parts) == 2 else parts[0]


def table(data_file: Path = ROOT / ".coverage") -> list[str]:
    """The per-package table's lines (empty when there is no data)."""
    cov = coverage.Coverage(data_file=str(data_file))
    cov.load()
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name in cov.get_data().measured_files():
        path = Path(name)
        if ROOT not in path.resolve().parents:
            continue
        _, statements, _, missing, _ = cov.analysis2(name)
        t = totals[package_of(path)]
        t[0] += len(statements)
        t[1] += len(statements) - len(missing)
    if not totals:
        return []
    width = max(map(len, totals))
    out = [f"{'package':<{width}}  {'lines':>6}  {'covered':>7}  {'cover':>6}"]
    all_lines = all_hit = 0
    for pkg in sorted(totals):
        lines, hit = totals[pkg]
        all_lines, all_hit = all_lines + lines, all_hit + hit
        out.append(f"{pkg:<{width}}  {lines:>6}  {hit:>7}  {100 * hit / max(lines, 1):>5.1f}%")
    total = 100 * all_hit / max(all_lines, 1)
    out.append(f"{'total':<{width}}  {all_lines:>6}  {all_hit:>7}  {total:>5.1f}%")
    return out


def main() -> int:
    lines = table()
    print("\n".join(lines) if lines else "no coverage data", file=sys.stdout if lines else sys.stderr)
    return 0 if lines else 1


if __name__ == "__main__":
    raise SystemExit(main())
