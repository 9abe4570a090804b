"""How fast bad Blueprints are refused: `esper validate` and the operator's validator on the hostile corpus.

Goal: every case refused in under 2 s (the corpus in tests/unit/test_hostile_blueprints.py: alias bombs,
deep nesting, 10,000 nodes, 5 MB strings, ...). Each case runs in this process (`esper validate` via
typer's runner, so the CLI's import time is not counted; it is about 0.6 s once per process).

    python benchmarks/hostile.py [--repeat 3]

Prints the slowest cases and writes benchmarks/results/hostile.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
GOAL_SECONDS = 2.0


def main() -> int:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "operator"))
    from typer.testing import CliRunner

    from esper.blueprint import BlueprintInvalid
    from esper.cli.main import app
    from esper_operator.plan import plan_blueprint
    from tests.unit.test_hostile_blueprints import CORPUS, _operator_spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="best of N per case")
    args = ap.parse_args()
    runner = CliRunner()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, manifest, _expected, operator in CORPUS:
            path = Path(tmp) / f"{case}.yaml"
            path.write_bytes(manifest.encode() if isinstance(manifest, str) else manifest)
            cli = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                result = runner.invoke(app, ["validate", str(path)])
                cli.append(time.perf_counter() - t0)
                if result.exit_code not in (1, 2):
                    raise SystemExit(f"{case}: esper validate exited {result.exit_code}")
            op = []
            if operator:
                spec = _operator_spec(manifest)
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    try:
                        plan_blueprint("hostile", spec, torch_version="2.13.0")
                    except BlueprintInvalid:
                        pass
                    else:
                        raise SystemExit(f"{case}: the operator's validator accepted it")
                    op.append(time.perf_counter() - t0)
            rows.append({"case": case, "cliSeconds": min(cli), "operatorSeconds": min(op) if op else None})
    rows.sort(key=lambda r: -max(r["cliSeconds"], r["operatorSeconds"] or 0))
    print(f"{'case':<36} {'esper validate':>15} {'operator':>10}")
    for r in rows[:12]:
        op_s = "" if r["operatorSeconds"] is None else f"{r['operatorSeconds'] * 1e3:>8.1f}ms"
        print(f"{r['case']:<36} {r['cliSeconds'] * 1e3:>13.1f}ms {op_s:>10}")
    worst = max(max(r["cliSeconds"], r["operatorSeconds"] or 0) for r in rows)
    ok = worst < GOAL_SECONDS
    verdict = "within" if ok else "OVER"
    print(f"{len(rows)} cases, slowest {worst:.3f} s: {verdict} the {GOAL_SECONDS:.0f} s goal")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "hostile.json"
    out.write_text(json.dumps({"goalSeconds": GOAL_SECONDS, "worstSeconds": worst, "cases": rows}, indent=2))
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
