"""The operator on the hybrid cluster: Blueprints and Kernels on the real API server (admission, status
subresource, generation, watches, resourceVersion conflicts all real), Jobs, Pods, Events and Secrets
on the emulator, one endpoint for kopf, kubectl and the fake kubelet. Garbage collection by
ownerReferences comes from the harness, standing in for kube-controller-manager."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import yaml

from tests.integration.test_operator import INVALID, Esper, small_blueprint
from tests.integration.test_operator import start_esper as start_esper  # a fixture, used by name
from tests.support.cluster import Cluster, wait_for

pytestmark = [pytest.mark.real_api, pytest.mark.cluster]
COMPILE_TIMEOUT = 240


@pytest.fixture
def cluster(real_cluster: Cluster) -> Cluster:
    """This module's cluster is always the real one, whatever ESPER_CLUSTER_BACKEND says."""
    return real_cluster


@pytest.fixture
def esper(start_esper: Callable[..., Esper]) -> Esper:
    return start_esper()


def strict_apply(esper: Esper, obj: dict) -> None:
    """As a user would: the server validates the fields (`--validate=strict`, the kubectl default)."""
    esper.cluster.kubectl("apply", "-f", "-", "--validate=strict", input=yaml.safe_dump(obj))


def test_blueprint_becomes_ready_and_kubectl_wait_sees_it(esper: Esper) -> None:
    assert esper.cluster.backend in ("hybrid", "full")
    strict_apply(esper, small_blueprint("real-ready", seed=71))
    waited = esper.cluster.kubectl(
        "wait",
        "--for=condition=Ready",
        "blueprint/real-ready",
        f"--timeout={COMPILE_TIMEOUT}s",
        timeout=COMPILE_TIMEOUT + 10,
    )
    assert waited.stdout.strip() == "blueprint.esper.dev/real-ready condition met"
    blueprint = esper.blueprint("real-ready")
    assert blueprint["status"]["phase"] == "Ready" and blueprint["status"]["kernelsSummary"] == "1/1"
    assert blueprint["status"]["observedGeneration"] == blueprint["metadata"]["generation"] == 1
    kernel = esper.cluster.get("kernels", blueprint["status"]["kernels"][0]["name"])
    assert kernel["status"]["phase"] == "Ready"
    assert [o["uid"] for o in kernel["metadata"]["ownerReferences"]] == [blueprint["metadata"]["uid"]]
    # The Job on the emulator belongs to the Kernel on the real server.
    (job,) = esper.jobs()
    assert job["metadata"]["labels"]["esper.dev/kernel-uid"] == kernel["metadata"]["uid"]
    assert kernel["status"]["jobName"] == job["metadata"]["name"]
    assert kernel["status"]["jobUid"] == job["metadata"]["uid"]  # the status field exists on the server


def test_invalid_blueprint_is_admitted_then_marked_invalid(esper: Esper) -> None:
    # Admission checks form; only the operator knows the op registry.
    esper.cluster.kubectl("apply", "-f", str(INVALID), "--validate=strict")
    name = yaml.safe_load(INVALID.read_text())["metadata"]["name"]
    esper.cluster.kubectl(
        "wait", "--for=condition=Valid=false", f"blueprint/{name}", "--timeout=60s", timeout=70
    )
    blueprint = esper.blueprint(name)
    assert blueprint["status"]["phase"] == "Invalid"
    valid = {c["type"]: c for c in blueprint["status"]["conditions"]}["Valid"]
    assert "spec.graph.nodes[1].op: unknown op 'rleu'" in valid["message"]
    assert esper.kernels() == [] and esper.jobs() == []


def test_deleting_a_ready_blueprint_leaves_nothing_behind(esper: Esper) -> None:
    esper.cluster.create(small_blueprint("real-delete", seed=72))
    blueprint = esper.wait_phase("blueprints", "real-delete", "Ready", timeout=COMPILE_TIMEOUT)
    key = esper.cluster.get("kernels", blueprint["status"]["kernels"][0]["name"])["spec"]["key"]
    esper.cluster.kubectl("delete", "blueprint/real-delete", "--timeout=60s", timeout=70)
    wait_for(lambda: not esper.kernels() and not esper.jobs(), 30, message="Kernels and Jobs gone")
    assert esper.blueprint("real-delete") is None
    assert esper.store.has_bundle(key)  # retention "keep": the artifact outlives its Kernel


def test_operator_restart_resumes_without_duplicating_work(esper: Esper) -> None:
    esper.kubelet.paused = True
    esper.cluster.create(small_blueprint("real-restart", seed=73))
    wait_for(lambda: len(esper.jobs()) == 1, 30, message="the compile Job")
    esper.operator.stop()
    esper.kubelet.paused = False  # the Job runs while no operator watches
    esper.operator.start()
    blueprint = esper.wait_phase("blueprints", "real-restart", "Ready", timeout=COMPILE_TIMEOUT)
    assert len(esper.jobs()) == 1 and len(esper.kernels()) == 1
    assert len(esper.kubelet.runs_of(esper.jobs()[0]["metadata"]["name"])) == 1
    assert blueprint["status"]["kernelsSummary"] == "1/1"
