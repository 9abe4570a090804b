"""The operator end to end on the emulated cluster: a real `kopf run` process, the real compile command
run by the fake kubelet, a moto S3, and the real kubectl where users would use it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from esper import signing
from esper.storage import open_store
from tests.support.cluster import Cluster, OperatorProcess, wait_for

# On the real API server (hybrid) where one is found: Blueprints and Kernels as a cluster keeps them.
pytestmark = [pytest.mark.cluster, pytest.mark.prefer_real]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "blueprint.yaml"
INVALID = REPO / "examples" / "invalid-blueprint.yaml"
COMPILE_TIMEOUT = 240
RESYNC_HOLD_SECONDS = 4  # how long a resync's read of a Job is held in the deletion test
COMPILE_NS = "esper-system"  # the operator's namespace: compile Jobs and the bucket's key live here only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_blueprint(
    name: str, *, seed: int = 0, features: int = 16, targets: list[str] | None = None
) -> dict:
    """A tiny residual MLP: compiles in seconds with a warm inductor cache."""
    return {
        "apiVersion": "esper.dev/v1alpha1",
        "kind": "Blueprint",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "template": {"name": "residual-mlp", "params": {"features": features, "hidden": 32, "blocks": 1}},
            "targets": targets or ["cpu"],
            "compile": {"initSeed": seed, "validateBatches": [1, 5], "benchmarkBatches": [8]},
        },
    }


class Esper:
    """The operator under test plus handles on everything around it."""

    def __init__(
        self,
        cluster: Cluster,
        kubelet: Any,
        operator: OperatorProcess,
        store_uri: str,
        metrics: int,
        public_key: Path,
    ):
        self.cluster, self.kubelet, self.operator = cluster, kubelet, operator
        self.store = open_store(store_uri)
        self.metrics_port = metrics
        self.trusted = signing.TrustedKeys.from_paths([public_key])

    def kernels(self) -> list[dict]:
        return self.cluster.list("kernels", "default")

    def jobs(self) -> list[dict]:
        return self.cluster.list("jobs", COMPILE_NS)

    def blueprint(self, name: str) -> dict | None:
        return self.cluster.get("blueprints", name)

    def phase(self, resource: str, name: str) -> str | None:
        obj = self.cluster.get(resource, name)
        return ((obj or {}).get("status") or {}).get("phase")

    def wait_phase(self, resource: str, name: str, phase: str, timeout: float = COMPILE_TIMEOUT) -> dict:
        def reached() -> bool:
            got = self.phase(resource, name)
            if got in ("Failed", "Invalid") and got != phase:
                raise AssertionError(
                    f"{resource}/{name} is {got}: {self.cluster.get(resource, name)['status']}"
                )
            return got == phase

        wait_for(
            reached, timeout, 0.2, message=lambda: f"{resource}/{name} {phase}\n{self.operator.log()[-3000:]}"
        )
        return self.cluster.get(resource, name)

    def events(self, name: str) -> list[dict]:
        return [e for e in self.cluster.list("events", "default") if e["involvedObject"]["name"] == name]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()


@pytest.fixture
def start_esper(
    cluster: Cluster,
    kubelet: Any,
    s3_server: str,
    s3_bucket: str,
    operator_process: Callable[..., OperatorProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., Esper]:
    """Start the operator configured as the Helm chart would: compile Jobs in the operator's namespace,
    the S3 credentials and the signing key in Secrets there; none in the tenant namespace ("default")."""

    def start(**overrides: str) -> Esper:
        secret = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        if cluster.get("namespaces", COMPILE_NS, namespace=None) is None:
            cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": COMPILE_NS}})
        cluster.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "esper-s3", "namespace": COMPILE_NS},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in secret.items()},
            }
        )
        keys = tmp_path_factory.mktemp("signing")
        signing.generate_key_pair(keys)  # the chart's signing-key Secret, as the kubelet would mount it
        port = _free_port()
        env = {
            "ESPER_STORE_URI": s3_bucket,
            "ESPER_S3_ENDPOINT": s3_server,
            "ESPER_S3_SECRET": "esper-s3",
            "ESPER_COMPILE_COMMAND": json.dumps([sys.executable, "-m", "esper.tezzeret"]),
            "ESPER_BACKOFF_LIMIT": "1",
            "ESPER_METRICS_PORT": str(port),
            "ESPER_RESYNC_SECONDS": "3",
            "ESPER_COMPILE_NAMESPACE": COMPILE_NS,
            "ESPER_SIGNING_SECRET": "esper-signing",
            **secret,
            **overrides,
        }
        kubelet.volume_dirs["scratch"] = tmp_path_factory.mktemp("node-cache")  # a node's warm cache
        kubelet.volume_dirs["signing-key"] = keys
        if os.environ.get("PYTHONPATH"):  # Jobs run the code under test, not the venv's installed copy
            kubelet.extra_env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        operator = operator_process("esper_operator.handlers", env=env)
        operator.wait_for_log("esper operator ready", timeout=60)
        return Esper(cluster, kubelet, operator, s3_bucket, port, keys / signing.PUBLIC_NAME)

    return start


@pytest.fixture
def esper(start_esper: Callable[..., Esper]) -> Esper:
    return start_esper()


def test_blueprint_becomes_a_ready_kernel_with_a_verified_artifact(esper: Esper, tmp_path: Path) -> None:
    kubectl = esper.cluster.kubectl
    kubectl("apply", "-f", str(EXAMPLE))
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    blueprint = esper.wait_phase("blueprints", name, "Ready")
    status = blueprint["status"]
    assert (
        status["kernelsSummary"] == "1/1"
        and status["observedGeneration"] == blueprint["metadata"]["generation"]
    )
    kernel = esper.cluster.get("kernels", status["kernels"][0]["name"])
    artifact = kernel["status"]["artifact"]
    assert kernel["status"]["report"]["maxAbsError"] <= kernel["status"]["report"]["tolerance"]
    assert kernel["status"]["toolchain"]["torch"].startswith("2.")
    # The bundle in S3 is whole and matches the sha256 the Kernel reports.
    bundle = esper.store.fetch_bundle(
        kernel["spec"]["key"], tmp_path / "bundle", expected_sha256=artifact["sha256"], trusted=esper.trusted
    )
    assert {
        "forward.pt2",
        "train_forward.pt2",
        "train_backward.pt2",
        "params.safetensors",
        "manifest.json",
        "manifest.sig",
    } <= {p.name for p in bundle.iterdir()}
    # Compiled in the operator's namespace; the tenant's namespace holds no Job and no Secret.
    assert kernel["status"]["jobNamespace"] == COMPILE_NS
    assert kernel["status"]["jobUid"] == esper.jobs()[0]["metadata"]["uid"]
    assert esper.cluster.list("jobs", "default") == [] and esper.cluster.list("secrets", "default") == []
    # Users see it the way kubectl shows it.
    table = kubectl("get", "kernels").stdout.splitlines()
    assert table[0].split() == ["NAME", "BLUEPRINT", "TARGET", "PHASE", "SPEEDUP", "AGE"]
    assert table[1].split()[:4] == [kernel["metadata"]["name"], name, "cpu", "Ready"]
    assert kubectl("get", "blueprints").stdout.splitlines()[1].split()[:3] == [name, "Ready", "1/1"]
    # One Event per thing that happened to the Kernel (no creation chatter: the first Job is in the
    # status), and the Blueprint's Ready.
    reasons = sorted(e["reason"] for e in esper.events(kernel["metadata"]["name"]))
    assert reasons == ["Compiled"]
    assert kernel["status"]["reason"] == "Compiled"
    blueprint_reasons = {e["reason"] for e in esper.events(name)}
    assert "Ready" in blueprint_reasons and "KernelCreated" not in blueprint_reasons
    assert 'esper_kernels{phase="Ready"} 1.0' in esper.metrics()
    # Delete through kubectl: finalizers run, nothing is left behind, the artifact is kept.
    kubectl("delete", "-f", str(EXAMPLE), "--timeout=60s")
    wait_for(lambda: not esper.kernels() and not esper.jobs(), 30)
    assert esper.blueprint(name) is None
    assert esper.store.has_bundle(kernel["spec"]["key"])


def test_identical_specs_share_kernels_and_jobs(esper: Esper) -> None:
    esper.kubelet.paused = True  # count Jobs; running them is the other tests' business
    for i in range(10):
        esper.cluster.create(small_blueprint(f"bp-{i}", seed=i % 3))
    wait_for(
        lambda: len(esper.jobs()) == 3 and all(esper.phase("blueprints", f"bp-{i}") for i in range(10)), 60
    )
    kernels = esper.kernels()
    assert len(kernels) == 3
    owners = sorted(len(k["metadata"]["ownerReferences"]) for k in kernels)
    assert owners == [3, 3, 4]
    assert {j["metadata"]["labels"]["esper.dev/kernel-uid"] for j in esper.jobs()} == {
        k["metadata"]["uid"] for k in kernels
    }
    # Deleting some owners keeps a shared Kernel; deleting the last one removes it and its Job.
    for i in (0, 3, 6):
        esper.cluster.delete("blueprints", f"bp-{i}")
    wait_for(
        lambda: len(esper.kernels()) == 3 and all(esper.blueprint(f"bp-{i}") is None for i in (0, 3, 6)), 30
    )
    for i in (9,):
        esper.cluster.delete("blueprints", f"bp-{i}")
    wait_for(lambda: len(esper.kernels()) == 2 and len(esper.jobs()) == 2, 30)


def test_invalid_blueprint_gets_a_condition_and_no_job(esper: Esper) -> None:
    esper.cluster.kubectl("apply", "-f", str(INVALID))
    name = yaml.safe_load(INVALID.read_text())["metadata"]["name"]
    blueprint = esper.wait_phase("blueprints", name, "Invalid", timeout=30)
    valid = {c["type"]: c for c in blueprint["status"]["conditions"]}["Valid"]
    assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
    assert "spec.graph.nodes[1].op: unknown op 'rleu'; did you mean 'relu'?" in valid["message"]
    assert any(e["reason"] == "Invalid" and e["type"] == "Warning" for e in esper.events(name))
    assert esper.kernels() == [] and esper.jobs() == []
    # Fixing the spec (a new generation) makes it valid and compiles it.
    fixed = small_blueprint(name)
    esper.cluster.kubectl.apply(fixed)
    blueprint = esper.wait_phase("blueprints", name, "Ready")
    assert blueprint["status"]["observedGeneration"] == blueprint["metadata"]["generation"] == 2


def test_failing_job_is_retried_then_fails_the_kernel_with_its_reason(
    start_esper: Callable[..., Esper],
) -> None:
    esper = start_esper(ESPER_RETRY_LIMIT="0")  # the Job's own Pod retries only: no second Job
    bp = small_blueprint("oom", seed=11)
    esper.kubelet.fail_next("tezzeret-cpu-", exit_code=137, reason="OOMKilled", times=2)
    esper.cluster.create(bp)
    blueprint = esper.wait_phase("blueprints", "oom", "Failed", timeout=60)
    kernel = esper.cluster.get("kernels", blueprint["status"]["kernels"][0]["name"])
    assert kernel["status"]["phase"] == "Failed" and kernel["status"]["reason"] == "OOMKilled"
    assert "after 2 attempt(s)" in kernel["status"]["message"]
    assert len(esper.kubelet.runs_of(kernel["status"]["jobName"])) == 2  # backoffLimit 1: two Pods
    assert any(
        e["reason"] == "OOMKilled" and e["type"] == "Warning"
        for e in esper.events(kernel["metadata"]["name"])
    )


def test_permanent_failure_is_not_retried(esper: Esper) -> None:
    esper.kubelet.fail_next(
        "tezzeret-cpu-", exit_code=67, reason="Error", message='{"error":{"message":"max error 3"}}'
    )
    esper.cluster.create(small_blueprint("numerics", seed=12))
    blueprint = esper.wait_phase("blueprints", "numerics", "Failed", timeout=60)
    kernel = esper.cluster.get("kernels", blueprint["status"]["kernels"][0]["name"])
    assert kernel["status"]["reason"] == "ValidationFailed"
    assert kernel["status"]["message"].endswith("max error 3")
    assert len(esper.kubelet.runs_of(kernel["status"]["jobName"])) == 1


def test_operator_restart_mid_compile_neither_duplicates_nor_loses_work(esper: Esper) -> None:
    esper.kubelet.paused = True
    esper.cluster.create(small_blueprint("restart", seed=21))
    wait_for(lambda: len(esper.jobs()) == 1, 30)
    esper.operator.stop()
    esper.kubelet.paused = False  # the Job runs (and may finish) while no operator watches
    esper.operator.start()
    blueprint = esper.wait_phase("blueprints", "restart", "Ready")
    assert len(esper.jobs()) == 1 and len(esper.kernels()) == 1
    assert len(esper.kubelet.runs_of(esper.jobs()[0]["metadata"]["name"])) == 1
    assert blueprint["status"]["kernelsSummary"] == "1/1"


def test_spec_change_makes_new_kernels_and_releases_old_ones(esper: Esper) -> None:
    esper.kubelet.paused = True
    esper.cluster.create(small_blueprint("evolve", seed=31))
    wait_for(lambda: len(esper.kernels()) == 1, 30)
    old = esper.kernels()[0]["metadata"]["name"]
    esper.cluster.patch("blueprints", "evolve", {"spec": {"compile": {"initSeed": 32}}})
    wait_for(
        lambda: (
            [k["metadata"]["name"] for k in esper.kernels()] not in ([], [old]) and len(esper.kernels()) == 1
        ),
        30,
        message=lambda: f"{[k['metadata']['name'] for k in esper.kernels()]}\n{esper.operator.log()[-4000:]}",
    )
    blueprint = esper.blueprint("evolve")
    wait_for(lambda: esper.blueprint("evolve")["status"].get("observedGeneration") == 2, 30)
    assert esper.kernels()[0]["metadata"]["name"] == blueprint["status"]["kernels"][0]["name"] != old


def test_deleting_while_compiling_leaves_nothing_stuck(esper: Esper) -> None:
    esper.kubelet.paused = True
    esper.cluster.create(small_blueprint("doomed", seed=41))
    wait_for(lambda: len(esper.jobs()) == 1, 30)
    esper.cluster.delete("blueprints", "doomed")
    wait_for(lambda: esper.blueprint("doomed") is None and not esper.kernels() and not esper.jobs(), 30)


def test_deleting_while_a_resync_is_in_flight_is_prompt(esper: Esper) -> None:
    """kopf holds a finalizer until the object's timers have exited; a resync caught mid-request
    must not hold the deletion for kopf's default re-check period (60 s)."""
    esper.kubelet.paused = True  # the Kernel stays Compiling: each resync reads its Job
    esper.cluster.create(small_blueprint("caught", seed=43))
    wait_for(lambda: len(esper.jobs()) == 1, 30)
    in_flight = threading.Event()

    def first_job_read(request: Any) -> bool:
        return (
            not in_flight.is_set()
            and request.method == "GET"
            and request.resource is not None
            and request.resource.plural == "jobs"
            and request.name is not None
        )

    async def held(request: Any) -> Any:
        in_flight.set()
        await asyncio.sleep(RESYNC_HOLD_SECONDS)
        raise NotImplementedError  # then served normally

    esper.cluster.call(lambda e: e[first_job_read] << held)
    assert in_flight.wait(30), "no resync read the Job"
    started = time.monotonic()
    esper.cluster.delete("blueprints", "caught")
    wait_for(lambda: esper.blueprint("caught") is None and not esper.kernels() and not esper.jobs(), 30)
    assert time.monotonic() - started >= RESYNC_HOLD_SECONDS - 1  # it did wait for the resync to end


def test_deleted_kernel_is_recreated_by_its_blueprint(esper: Esper) -> None:
    esper.kubelet.paused = True
    esper.cluster.create(small_blueprint("heal", seed=51))
    wait_for(lambda: len(esper.kernels()) == 1, 30)
    kernel = esper.kernels()[0]
    esper.cluster.delete("kernels", kernel["metadata"]["name"])
    # The periodic resync (3 s here) notices and recreates it, with a new uid.
    wait_for(
        lambda: [k["metadata"]["uid"] for k in esper.kernels()] not in ([], [kernel["metadata"]["uid"]]), 30
    )


def test_retention_delete_removes_the_artifact_with_the_kernel(start_esper: Callable[..., Esper]) -> None:
    esper = start_esper(ESPER_RETENTION="delete")
    esper.cluster.create(small_blueprint("ephemeral", seed=61))
    blueprint = esper.wait_phase("blueprints", "ephemeral", "Ready")
    key = esper.cluster.get("kernels", blueprint["status"]["kernels"][0]["name"])["spec"]["key"]
    assert esper.store.has_bundle(key)
    esper.cluster.delete("blueprints", "ephemeral")
    wait_for(lambda: not esper.kernels() and not esper.store.has_bundle(key), 30)


# ---- attacks: each one changed a Kernel or a bundle before; now refused, with a Warning Event -------


def _warnings(esper: Esper, kernel: str, reason: str) -> list[dict]:
    return [e for e in esper.events(kernel) if e["type"] == "Warning" and e["reason"] == reason]


def test_planted_bundle_is_refused_recompiled_and_replaced(esper: Esper, tmp_path: Path) -> None:
    """A bucket writer plants a bundle under the key a Blueprint will get: the compile Job does not
    trust it (unsigned), compiles, replaces it with a signed bundle, and the Kernel says so."""
    from esper.artifact import read_manifest, write_manifest
    from esper_operator.plan import plan_blueprint
    from tests.support.s3 import make_fake_bundle

    bp = small_blueprint("planted", seed=71)
    key = plan_blueprint("planted", bp["spec"], torch_version="2.13.0").kernels[0].spec.key
    planted = tmp_path / "planted"
    make_fake_bundle(planted, seed=71, signed=False)
    write_manifest(planted, read_manifest(planted).model_copy(update={"key": key}))
    planted_sha = esper.store.put_bundle(key, planted).sha256
    esper.cluster.create(bp)
    blueprint = esper.wait_phase("blueprints", "planted", "Ready")
    kernel = esper.cluster.get("kernels", blueprint["status"]["kernels"][0]["name"])
    assert kernel["status"]["artifact"]["sha256"] != planted_sha
    fetched = esper.store.fetch_bundle(
        key, tmp_path / "b", kernel["status"]["artifact"]["sha256"], trusted=esper.trusted
    )
    assert read_manifest(fetched).key == key
    replaced = _warnings(esper, kernel["metadata"]["name"], "BundleReplaced")
    assert replaced and "unsigned" in replaced[0]["message"]


def test_forged_job_and_bare_pod_are_ignored(esper: Esper) -> None:
    """A Job the operator did not create, wearing its labels, and a bare Pod carrying the real Job's
    job-name label, both 'finish' with a result: the Kernel does not change; Warnings say why."""
    esper.kubelet.paused = True  # the real Job never runs: only the forgeries finish
    esper.cluster.create(small_blueprint("victim", seed=81))
    wait_for(
        lambda: len(esper.jobs()) == 1 and (esper.kernels() or [{}])[0].get("status", {}).get("jobUid"), 30
    )
    kernel = esper.kernels()[0]
    name, key = kernel["metadata"]["name"], kernel["spec"]["key"]
    real_job = esper.jobs()[0]
    evil = json.dumps({**_result(key), "uri": "s3://attacker/kernels/" + key})

    forged = esper.cluster.create(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "forged", "namespace": "default", "labels": real_job["metadata"]["labels"]},
            "spec": {"suspend": True, "template": real_job["spec"]["template"]},
        }
    )
    _finish_job(esper, forged)
    _succeeded_pod(esper, "forged-pod", "default", forged, evil)
    wait_for(lambda: _warnings(esper, name, "ForeignJob"), 30)

    # A bare Pod in the compile namespace with the real Job's name, then the real Job "completes".
    bare = {"metadata": {"name": real_job["metadata"]["name"], "uid": ""}}
    _succeeded_pod(esper, "bare-pod", COMPILE_NS, bare, evil)
    _finish_job(esper, real_job)
    wait_for(lambda: _warnings(esper, name, "ForeignPod"), 30)
    status = esper.cluster.get("kernels", name)["status"]
    assert status["phase"] == "Compiling" and status.get("artifact") is None
    assert status["jobUid"] == real_job["metadata"]["uid"]


def test_a_result_for_another_key_is_ignored(esper: Esper) -> None:
    """The genuine Job's own Pod reports a bundle under another key: ignored, the Kernel unchanged."""
    other = "c" * 64
    message = json.dumps({**_result(other), "uri": "s3://x/kernels/" + other})
    esper.kubelet.fail_next("tezzeret-cpu-", exit_code=0, reason="Completed", message=message)
    esper.cluster.create(small_blueprint("wrongkey", seed=91))
    wait_for(
        lambda: esper.kernels() and _warnings(esper, esper.kernels()[0]["metadata"]["name"], "KeyMismatch"),
        60,
    )
    status = esper.kernels()[0]["status"]
    assert status["phase"] == "Compiling" and status.get("artifact") is None


def test_missing_secret_is_reported_on_the_kernel_promptly(start_esper: Callable[..., Esper]) -> None:
    esper = start_esper(ESPER_S3_SECRET="no-such-secret")
    esper.cluster.create(small_blueprint("nosecret", seed=95))

    def reported() -> bool:
        status = (esper.kernels() or [{}])[0].get("status") or {}
        return status.get("reason") == "CreateContainerConfigError"

    wait_for(reported, 30)
    kernel = esper.kernels()[0]
    assert "no-such-secret" in kernel["status"]["message"] and kernel["status"]["phase"] == "Compiling"
    assert _warnings(esper, kernel["metadata"]["name"], "CreateContainerConfigError")


def test_retention_delete_keeps_a_bundle_another_namespace_uses(start_esper: Callable[..., Esper]) -> None:
    """A tenant creating and deleting a Blueprint with another namespace's spec no longer deletes the
    bundle that namespace's Ready Kernel uses."""
    esper = start_esper(ESPER_RETENTION="delete")
    esper.cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-b"}})
    esper.cluster.create(small_blueprint("shared", seed=97))
    blueprint = esper.wait_phase("blueprints", "shared", "Ready")
    kernel = esper.cluster.get("kernels", blueprint["status"]["kernels"][0]["name"])
    key = kernel["spec"]["key"]
    other = small_blueprint("shared", seed=97)
    other["metadata"]["namespace"] = "team-b"
    esper.cluster.create(other)

    def ready_in_b() -> bool:
        bp = esper.cluster.get("blueprints", "shared", namespace="team-b")
        return ((bp or {}).get("status") or {}).get("phase") == "Ready"

    wait_for(ready_in_b, COMPILE_TIMEOUT)
    esper.cluster.delete("blueprints", "shared", namespace="team-b")
    wait_for(lambda: esper.cluster.list("kernels", "team-b") == [], 30)
    wait_for(
        lambda: (
            not [j for j in esper.jobs() if j["metadata"]["labels"]["esper.dev/kernel-namespace"] == "team-b"]
        ),
        30,
    )
    assert esper.store.has_bundle(key)
    assert esper.phase("kernels", kernel["metadata"]["name"]) == "Ready"
    esper.cluster.delete("blueprints", "shared")  # the last user: now the bundle goes
    wait_for(lambda: not esper.store.has_bundle(key), 30)


def _result(key: str) -> dict:
    return {
        "key": key,
        "uri": "s3://x/kernels/" + key,
        "manifestSha256": "b" * 64,
        "size": 1,
        "toolchain": {"torch": "2.13.0", "capability": "cpu-avx2"},
    }


def _finish_job(esper: Esper, job: dict) -> None:
    now = "2026-01-01T00:00:00Z"
    conditions = [
        {"type": t, "status": "True", "lastTransitionTime": now} for t in ("SuccessCriteriaMet", "Complete")
    ]
    status = {"succeeded": 1, "startTime": now, "completionTime": now, "conditions": conditions}
    esper.cluster.patch(
        "jobs",
        job["metadata"]["name"],
        {"status": status},
        namespace=job["metadata"]["namespace"],
        status=True,
    )


def _succeeded_pod(esper: Esper, name: str, namespace: str, job: dict, message: str) -> None:
    labels = {"job-name": job["metadata"]["name"], "controller-uid": job["metadata"]["uid"]}
    refs = (
        [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": job["metadata"]["name"],
                "uid": job["metadata"]["uid"],
                "controller": True,
            }
        ]
        if job["metadata"]["uid"]
        else []
    )
    esper.cluster.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels, "ownerReferences": refs},
            "spec": {"containers": [{"name": "tezzeret", "image": "x"}]},
        }
    )
    terminated = {
        "exitCode": 0,
        "reason": "Completed",
        "message": message,
        "finishedAt": "2026-01-01T00:00:00Z",
    }
    status = {
        "phase": "Succeeded",
        "containerStatuses": [{"name": "tezzeret", "state": {"terminated": terminated}}],
    }
    esper.cluster.patch("pods", name, {"status": status}, namespace=namespace, status=True)
