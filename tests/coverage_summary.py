"""Print line coverage per package from the `.coverage` file `make test` leaves (pytest-cov).

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


def main() -> int:
    cov = coverage.Coverage(data_file=str(ROOT / ".coverage"))
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
        print("no coverage data", file=sys.stderr)
        return 1
    width = max(map(len, totals))
    print(f"\n{'package':<{width}}  {'lines':>6}  {'covered':>7}  {'cover':>6}")
    all_lines = all_hit = 0
    for pkg in sorted(totals):
        lines, hit = totals[pkg]
        all_lines, all_hit = all_lines + lines, all_hit + hit
        print(f"{pkg:<{width}}  {lines:>6}  {hit:>7}  {100 * hit / max(lines, 1):>5.1f}%")
    print(f"{'total':<{width}}  {all_lines:>6}  {all_hit:>7}  {100 * all_hit / max(all_lines, 1):>5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
