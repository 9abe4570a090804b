"""The catalogue on the hybrid cluster (Blueprints and Kernels on the real API server, Jobs and Pods on
the emulator): requesters on shared Kernels, keep-last-good rollouts and rollback, retries and the
compile queue, `esper kernels` queries and `esper gc` (a real `kopf run` operator, the fake kubelet
running the real compile command, a moto S3)."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from typer.testing import CliRunner

from esper.cli import catalogue
from esper.cli.main import app
from esper.contracts.naming import requester_label, serving_selector
from tests.integration.test_operator import COMPILE_NS, Esper, small_blueprint, start_esper  # noqa: F401
from tests.support.cluster import Cluster, wait_for
from tests.support.s3 import make_fake_bundle

pytestmark = [pytest.mark.real_api, pytest.mark.cluster]
LONG = "catalogue-" + "x" * 180 + "-long"


@pytest.fixture
def cluster(real_cluster: Cluster) -> Cluster:
    """Blueprints and Kernels on the real API server (admission, selectors, conflicts all real)."""
    return real_cluster


def esper_cli(esper: Esper, *args: str) -> Any:
    result = CliRunner().invoke(app, [*args, "--kubeconfig", str(esper.cluster.kubeconfig_path)])
    return result


def roles(esper: Esper, kernel: str) -> dict[str, str]:
    """Requester -> role, as status.requesters says."""
    status = esper.cluster.get("kernels", kernel).get("status") or {}
    return {r["blueprint"]: r["role"] for r in status.get("requesters") or []}


def selected(esper: Esper, selector: str) -> list[str]:
    out = esper.cluster.kubectl("get", "kernels", "-l", selector, "-o", "name").stdout.split()
    return sorted(name.split("/", 1)[1] for name in out)


def test_requesters_keep_last_good_and_rollback(start_esper: Callable[..., Esper]) -> None:  # noqa: F811
    esper = start_esper()
    kubectl = esper.cluster.kubectl
    for name in ("first", "second", LONG):
        esper.cluster.create(small_blueprint(name, seed=71))
    esper.wait_phase("blueprints", "first", "Ready")
    k1 = esper.blueprint("first")["status"]["kernels"][0]["name"]
    everyone = {"first": "serving", "second": "serving", LONG: "serving"}
    wait_for(lambda: roles(esper, k1) == everyone, 30, message=lambda: str(roles(esper, k1)))
    # Every requester finds the shared Kernel by label, long names included; the columns name them all.
    for name in ("first", "second", LONG):
        assert selected(esper, serving_selector(name)) == [k1]
    assert kubectl("get", "kernels", k1, "-o", "jsonpath={.status.requestedBy}").stdout == ",".join(
        sorted(["first", "second", LONG])
    )
    # A deleted requester leaves no trace on the Kernel.
    esper.cluster.delete("blueprints", "first")
    wait_for(lambda: roles(esper, k1) == {"second": "serving", LONG: "serving"}, 30)
    assert requester_label("first") not in esper.cluster.get("kernels", k1)["metadata"]["labels"]
    assert selected(esper, requester_label("first")) == []

    # An edit: the old Kernel keeps serving while the new one compiles.
    esper.kubelet.paused = True
    esper.cluster.patch("blueprints", "second", {"spec": {"compile": {"initSeed": 72}}})
    wait_for(lambda: len(esper.blueprint("second")["status"]["kernels"]) == 1
             and esper.blueprint("second")["status"]["kernels"][0]["name"] != k1, 30)  # fmt: skip
    status = esper.blueprint("second")["status"]
    k2 = status["kernels"][0]["name"]
    assert status["revision"] == 2 and status["serving"] == [{"target": "cpu", "name": k1, "phase": "Ready"}]
    assert status["history"] == [{"revision": 1, "digest": status["history"][0]["digest"],
                                  "kernels": [{"target": "cpu", "name": k1}]}]  # fmt: skip
    wait_for(lambda: roles(esper, k2) == {"second": "candidate"}, 30)
    assert roles(esper, k1) == {"second": "serving", LONG: "serving"}
    assert selected(esper, serving_selector("second")) == [k1]
    assert kubectl("get", "blueprints", "second").stdout.splitlines()[1].split()[1:4] == [
        "Compiling", "0/1", "1/1",
    ]  # fmt: skip

    # An invalid edit: Invalid, and nothing is released or stops serving.
    esper.cluster.patch("blueprints", "second", {"spec": {"template": {"params": {"features": 0}}}})
    esper.wait_phase("blueprints", "second", "Invalid", timeout=30)
    status = esper.blueprint("second")["status"]
    assert status["serving"][0]["name"] == k1 and status["kernels"][0]["name"] == k2
    assert {k["metadata"]["name"] for k in esper.kernels()} == {k1, k2}
    assert selected(esper, serving_selector("second")) == [k1]

    # Fixed: the new Kernel compiles, then the Blueprint switches to it; the old one is retained.
    esper.cluster.patch("blueprints", "second", {"spec": {"template": {"params": {"features": 16}}}})
    esper.kubelet.paused = False
    esper.wait_phase("blueprints", "second", "Ready")
    wait_for(lambda: esper.blueprint("second")["status"]["serving"][0]["name"] == k2, 30)
    wait_for(lambda: roles(esper, k1) == {"second": "retained", LONG: "serving"}, 30)
    assert selected(esper, serving_selector("second")) == [k2]
    assert esper.blueprint("second")["status"]["revision"] == 2

    # Rollback: the retained Kernel serves again at once, no compile.
    jobs = len(esper.jobs())
    result = esper_cli(esper, "rollback", "second")
    assert result.exit_code == 0, result.output
    assert "revision 1" in result.output
    wait_for(lambda: esper.blueprint("second")["status"]["serving"][0]["name"] == k1, 30)
    status = esper.blueprint("second")["status"]
    assert status["revision"] == 3 and status["phase"] == "Ready"
    assert [h["kernels"][0]["name"] for h in status["history"]] == [k2]
    wait_for(lambda: roles(esper, k2) == {"second": "retained"}, 30)
    assert len(esper.jobs()) == jobs
    bad = esper_cli(esper, "rollback", "second", "--to-revision", "7")
    assert bad.exit_code == 1 and "no revision 7 (kept: 2)" in bad.output


def compile_job(kernel: dict[str, Any]) -> str:
    """The first attempt's Job: `tezzeret-<kernel name>-<the Kernel's uid, 8 hex digits>`."""
    return f"tezzeret-{kernel['metadata']['name']}-{kernel['metadata']['uid'].replace('-', '')[:8]}"


def test_transient_failures_are_retried_and_failed_kernels_retried_on_request(
    start_esper: Callable[..., Esper],  # noqa: F811
) -> None:
    esper = start_esper(ESPER_RETRY_BASE_SECONDS="0.2", ESPER_RETRY_LIMIT="1", ESPER_QUEUE_SECONDS="0.5")
    # Each attempt's Job has backoffLimit 1 (two Pods); two OOM-killed Pods fail the first attempt.
    esper.kubelet.fail_next("tezzeret-cpu-", exit_code=137, reason="OOMKilled", times=2)
    esper.cluster.create(small_blueprint("flaky", seed=81))
    blueprint = esper.wait_phase("blueprints", "flaky", "Ready")
    kernel = esper.cluster.get("kernels", blueprint["status"]["kernels"][0]["name"])
    first = compile_job(kernel)
    assert kernel["status"]["attempts"] == 2 and kernel["status"]["jobName"] == f"{first}-2"
    assert [r.job for r in esper.kubelet.runs if r.job.startswith(first)] == [first, first, f"{first}-2"]
    reasons = [e["reason"] for e in esper.events(kernel["metadata"]["name"])]
    assert "OOMKilled" in reasons
    retried = [e["message"] for e in esper.events(kernel["metadata"]["name"]) if e["reason"] == "JobCreated"]
    assert retried == [f"compile Job {COMPILE_NS}/{first}-2, attempt 2"]

    # A permanent failure is not retried by itself; `esper retry` compiles it again.
    esper.kubelet.fail_next("tezzeret-cpu-", exit_code=67, reason="Error", message="max error 3")
    esper.cluster.create(small_blueprint("numerics", seed=82))
    blueprint = esper.wait_phase("blueprints", "numerics", "Failed", timeout=60)
    name = blueprint["status"]["kernels"][0]["name"]
    assert esper.cluster.get("kernels", name)["status"]["attempts"] == 1
    refused = esper_cli(esper, "retry", blueprint["status"]["kernels"][0]["name"] + "-nope")
    assert refused.exit_code == 2
    result = esper_cli(esper, "retry", name)
    assert result.exit_code == 0, result.output
    esper.wait_phase("blueprints", "numerics", "Ready")
    kernel = esper.cluster.get("kernels", name)
    assert kernel["status"]["attempts"] == 2 and kernel["status"]["retryToken"]
    assert esper.cluster.get("jobs", compile_job(kernel), namespace=COMPILE_NS) is None  # attempt 1: gone
    again = esper_cli(esper, "retry", name)
    assert again.exit_code == 1 and "is Ready: only a Failed one is retried" in again.output


def test_concurrent_compile_jobs_are_capped_and_the_rest_queued(
    start_esper: Callable[..., Esper],  # noqa: F811
) -> None:
    esper = start_esper(ESPER_MAX_CONCURRENT_JOBS="1", ESPER_QUEUE_SECONDS="0.5")
    esper.kubelet.paused = True
    for i in range(3):
        esper.cluster.create(small_blueprint(f"q-{i}", seed=90 + i))
    wait_for(lambda: len(esper.kernels()) == 3 and len(esper.jobs()) == 1, 30)
    wait_for(lambda: sum((k.get("status") or {}).get("reason") == "Queued" for k in esper.kernels()) == 2, 30)
    queued = [k for k in esper.kernels() if k["status"]["reason"] == "Queued"]
    assert all(k["status"]["phase"] == "Pending" for k in queued)
    assert "1 of 1 in use" in queued[0]["status"]["message"]
    assert len(esper.jobs()) == 1  # still: the queue does not leak while the slot is taken
    # The Jobs fail at once (a permanent reason, so no retries): each frees its slot for the next.
    esper.kubelet.fail_next("tezzeret-cpu-", exit_code=67, reason="Error", message="max error 3", times=3)
    esper.kubelet.max_parallel = 3  # the node could run them all: only the cap holds them back
    esper.kubelet.paused = False
    most = [0]

    def all_failed() -> bool:
        running = [j for j in esper.jobs() if not (j.get("status") or {}).get("conditions")]
        most[0] = max(most[0], len(running))
        return all(esper.phase("blueprints", f"q-{i}") == "Failed" for i in range(3))

    wait_for(all_failed, 120, 0.05)
    assert most[0] == 1 and len(esper.kubelet.seen_jobs()) == 3
    assert {k["status"]["reason"] for k in esper.kernels()} == {"ValidationFailed"}


def test_kernel_queries_and_gc_safe_under_a_concurrent_compile(
    start_esper: Callable[..., Esper],  # noqa: F811
    tmp_path: Path,
) -> None:
    esper = start_esper()
    # query-b's only Job fails at once (permanent); query-a compiles.
    esper.kubelet.fail_next("tezzeret-cpu-", exit_code=67, reason="Error", message="max error 3")
    esper.cluster.create(small_blueprint("query-b", seed=102))
    b = esper.wait_phase("blueprints", "query-b", "Failed", timeout=60)["status"]["kernels"][0]["name"]
    esper.cluster.create(small_blueprint("query-a", seed=101))
    a = esper.wait_phase("blueprints", "query-a", "Ready", timeout=600)["status"]["kernels"][0]["name"]

    def names(*args: str) -> list[str]:
        result = esper_cli(esper, "kernels", "--cluster", "-o", "json", *args)
        assert result.exit_code == 0, result.output
        return [r["name"] for r in json.loads(result.output)]

    assert names() == sorted([a, b])
    assert names("--blueprint", "query-a") == [a]
    assert names("--template", "residual-mlp", "--target", "cpu") == sorted([a, b])
    assert names("--phase", "Ready") == [a] and names("--phase", "Failed") == [b]
    assert names("--target", "cuda-sm90") == []
    assert names("-l", serving_selector("query-a")) == [a]
    assert names("-l", serving_selector("query-b")) == []  # Failed: a candidate, never served
    assert names("-A", "--blueprint", "query-b") == [b]
    assert names("--min-speedup", "0") == [a]  # a Failed Kernel has no speed-up to compare
    rows = json.loads(esper_cli(esper, "kernels", "--cluster", "-o", "json").output)
    assert {r["name"]: (r["blueprints"], r["phase"]) for r in rows} == {
        a: (["query-a"], "Ready"), b: (["query-b"], "Failed"),
    }  # fmt: skip
    table = esper_cli(esper, "kernels", "--cluster", "--blueprint", "query-a")
    assert table.exit_code == 0 and a in table.output and b not in table.output
    store_only = esper_cli(esper, "kernels", "--store", esper.store.uri, "--phase", "Ready")
    assert store_only.exit_code == 2 and "--phase need a cluster" in store_only.output
    assert esper_cli(esper, "kernels", "--cluster", "--phase", "Done").exit_code == 2

    # gc: lists, by default only, bundles no Kernel references and older than the threshold.
    two_days_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    old_key, _ = make_fake_bundle(tmp_path / "old", seed=1, created_at=two_days_ago)
    fresh_key, _ = make_fake_bundle(tmp_path / "fresh", seed=2)
    esper.store.put_bundle(old_key, tmp_path / "old")
    esper.store.put_bundle(fresh_key, tmp_path / "fresh")
    used = {k["spec"]["key"] for k in esper.kernels() if k["status"]["phase"] == "Ready"}
    dry = esper_cli(esper, "gc", "--store", esper.store.uri, "--min-age", "1h")
    assert dry.exit_code == 0, dry.output
    listed = {line.split()[0] for line in dry.output.splitlines() if line.endswith("  unreferenced")}
    assert listed == {old_key} and "dry run" in dry.output and esper.store.has_bundle(old_key)
    done = esper_cli(esper, "gc", "--store", esper.store.uri, "--min-age", "1h", "--delete")
    assert done.exit_code == 0 and "deleted 1" in done.output, done.output
    assert not esper.store.has_bundle(old_key) and esper.store.has_bundle(fresh_key)
    assert used and all(esper.store.has_bundle(k) for k in used)
    assert esper_cli(esper, "gc", "--store", esper.store.uri, "--min-age", "soon").exit_code == 2

    # Collected over and over, with no age threshold, while a compile writes its bundle: it survives.
    api = client.CustomObjectsApi(esper.cluster.api_client())
    stop, passes, deleted = threading.Event(), [0], []

    def collect() -> None:
        while not stop.is_set():
            orphans = catalogue.find_orphans(
                esper.store, lambda: catalogue.referenced_keys(api), dt.timedelta()
            )
            deleted.extend(
                catalogue.delete_orphans(esper.store, orphans, lambda: catalogue.referenced_keys(api))
            )
            passes[0] += 1

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    try:
        esper.cluster.create(small_blueprint("query-d", seed=104))
        blueprint = esper.wait_phase("blueprints", "query-d", "Ready", timeout=600)
    finally:
        stop.set()
        collector.join(30)
    kernel = esper.cluster.get("kernels", blueprint["status"]["kernels"][0]["name"])
    artifact = kernel["status"]["artifact"]
    esper.store.fetch_bundle(kernel["spec"]["key"], tmp_path / "d", expected_sha256=artifact["sha256"])
    assert passes[0] > 1 and deleted == [fresh_key]
