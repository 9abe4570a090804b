"""Operator benchmark: Blueprint -> Job latency, 1,000 Blueprints -> Jobs, and operator memory.

Runs the real operator (`kopf run -m esper_operator.handlers`) and, beside it on the same emulated API
server in the same run, a baseline kopf operator that only creates a Job per Blueprint
(benchmarks/noop_operator.py). Each gets its own namespace and runs alone. Nothing compiles: no
kubelet runs the Jobs, so this measures the control plane only.

    python benchmarks/operator.py            # 50 latency samples, 1,000 Blueprints
    python benchmarks/operator.py --quick    # 20 samples, 200 Blueprints

Prints a table and writes benchmarks/results/operator.json. Targets: p50 <= 250 ms, 1,000 in <= 60 s,
RSS <= 200 MB.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.cluster import Cluster, OperatorProcess, wait_for  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
TARGETS = {"p50_ms": 250.0, "bulk_seconds": 60.0, "rss_mb": 200.0}


def blueprint(name: str, namespace: str, seed: int) -> dict[str, Any]:
    return {
        "apiVersion": "esper.dev/v1alpha1",
        "kind": "Blueprint",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "template": {"name": "residual-mlp", "params": {"features": 64, "hidden": 256, "blocks": 2}},
            "targets": ["cpu"],
            "compile": {"initSeed": seed},
        },
    }


class JobClock:
    """Records when each Job of a namespace first appears, from a watch (no polling error)."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._proc = cluster.kubectl.popen(
            "get",
            "jobs",
            "-n",
            namespace,
            "--watch-only",
            "-o",
            "custom-columns=NAME:.metadata.name",
            "--no-headers",
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            name = line.strip()
            if name:
                with self._lock:
                    self.seen.setdefault(name, time.perf_counter())

    def count(self) -> int:
        with self._lock:
            return len(self.seen)

    def times(self) -> list[float]:
        with self._lock:
            return sorted(self.seen.values())

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(5)


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def measure(
    cluster: Cluster,
    name: str,
    target: str,
    env: dict[str, str],
    samples: int,
    bulk: int,
    log_dir: Path,
    console: Console,
) -> dict[str, Any]:
    namespace = f"bench-{name}"
    cluster.ensure_namespace(namespace)
    # The operator watches one namespace; its compile Jobs go there too (the compile namespace).
    env = {**env, "ESPER_COMPILE_NAMESPACE": namespace}
    operator = OperatorProcess(target, cluster, log_dir / f"{name}.log", env=env, namespace=namespace)
    operator.start()
    clock = JobClock(cluster, namespace)
    try:
        operator.wait_for_log("Initial authentication has finished", 60)
        cluster.create(blueprint("warmup", namespace, seed=99_999))  # the watch is up once this lands
        wait_for(lambda: clock.count() == 1, 60, 0.01)
        idle_rss, _ = rss_mb(operator.proc.pid)
        latencies = []
        for i in range(samples):
            before = clock.count()
            start = time.perf_counter()
            cluster.create(blueprint(f"lat-{i}", namespace, seed=10_000 + i))
            wait_for(lambda b=before: clock.count() > b, 30, 0.002)
            latencies.append((clock.times()[-1] - start) * 1000)
        console.print(f"[{name}] latency: {samples} samples done")
        before = clock.count()
        first_request = cluster.call(lambda e: e.request_count())
        start = time.perf_counter()
        for i in range(bulk):
            cluster.create(blueprint(f"bulk-{i}", namespace, seed=i))
        created = time.perf_counter() - start
        wait_for(lambda: clock.count() >= before + bulk, 600, 0.05)
        bulk_seconds = clock.times()[-1] - start
        rss, peak = rss_mb(operator.proc.pid)
        console.print(f"[{name}] bulk: {bulk} Blueprints -> Jobs in {bulk_seconds:.1f} s")
        writes = settled_writes(cluster, first_request)

    finally:
        clock.close()
        operator.stop()
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies),
        "p95_ms": latencies[max(0, round(0.95 * len(latencies)) - 1)],
        "max_ms": latencies[-1],
        "bulk": bulk,
        "bulk_create_seconds": created,
        "bulk_seconds": bulk_seconds,
        "bulk_per_second": bulk / bulk_seconds,
        "idle_rss_mb": idle_rss,
        "rss_mb": rss,
        "peak_rss_mb": peak,
        "writes_per_blueprint": sum(writes.values()) / bulk,
        "writes": {f"{verb} {what}": n / bulk for (verb, what), n in sorted(writes.items())},
    }


def settled_writes(cluster: Cluster, since: int, quiet: float = 3.0) -> collections.Counter[tuple[str, str]]:
    """The operator's writes since request `since`, once it has made none for `quiet` seconds (its
    Events and status patches trail the Jobs), the benchmark's own Blueprint creates left out."""

    def count() -> int:
        return len(cluster.call(lambda e: e.writes(since)))

    last, last_change = count(), time.monotonic()
    deadline = time.monotonic() + 300
    while time.monotonic() - last_change < quiet and time.monotonic() < deadline:
        time.sleep(0.5)
        now = count()
        if now != last:
            last, last_change = now, time.monotonic()
    writes = collections.Counter((verb, what) for verb, what, _, _ in cluster.call(lambda e: e.writes(since)))
    del writes[("POST", "blueprints")]
    return writes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Esper operator benchmark")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--bulk", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="20 samples, 200 Blueprints")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.bulk = 20, 200
    console = Console()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, Cluster(Path(tmp) / "cluster") as cluster:
        env = {
            "ESPER_STORE_URI": "s3://bench/kernels",
            "ESPER_METRICS_PORT": "0",
            "ESPER_RESYNC_SECONDS": "3600",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
        }
        results["esper"] = measure(
            cluster,
            "esper",
            "esper_operator.handlers",
            env,
            args.samples,
            args.bulk,
            Path(tmp),
            console,
        )
        results["baseline"] = measure(
            cluster,
            "noop",
            str(REPO / "benchmarks" / "noop_operator.py"),
            {},
            args.samples,
            args.bulk,
            Path(tmp),
            console,
        )
    esper, base = results["esper"], results["baseline"]
    table = Table(
        title=f"Esper operator vs a baseline kopf operator ({args.bulk} Blueprints, {args.samples} samples)"
    )
    for column in ("measure", "esper", "baseline", "target", "ok"):
        table.add_column(column, justify="left" if column == "measure" else "right")

    def row(label: str, key: str, fmt: str, target: float | None) -> None:
        ok = "" if target is None else ("yes" if esper[key] <= target else "NO")
        table.add_row(
            label,
            fmt.format(esper[key]),
            fmt.format(base[key]),
            "" if target is None else fmt.format(target),
            ok,
        )

    row("create -> Job p50 (ms)", "p50_ms", "{:.0f}", TARGETS["p50_ms"])
    row("create -> Job p95 (ms)", "p95_ms", "{:.0f}", None)
    row(
        f"{args.bulk} Blueprints -> Jobs (s)",
        "bulk_seconds",
        "{:.1f}",
        TARGETS["bulk_seconds"] * args.bulk / 1000,
    )
    row("Jobs per second", "bulk_per_second", "{:.1f}", None)
    row("operator RSS after (MB)", "rss_mb", "{:.0f}", TARGETS["rss_mb"])
    row("operator peak RSS (MB)", "peak_rss_mb", "{:.0f}", None)
    row("API writes per Blueprint", "writes_per_blueprint", "{:.2f}", None)
    console.print(table)
    writes = Table(title="API writes per Blueprint (bulk phase), by request")
    for column in ("request", "esper", "baseline"):
        writes.add_column(column, justify="left" if column == "request" else "right")
    for request in sorted(set(esper["writes"]) | set(base["writes"])):
        writes.add_row(
            request, f"{esper['writes'].get(request, 0):.2f}", f"{base['writes'].get(request, 0):.2f}"
        )
    console.print(writes)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"args": vars(args), "targets": TARGETS, **results}
    (RESULTS / "operator.json").write_text(json.dumps(out, indent=2))
    console.print(f"wrote {RESULTS / 'operator.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
