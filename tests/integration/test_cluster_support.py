"""The emulated cluster behaves like a real one where the operator relies on it.

Covers the emulator's API semantics, the real kubectl against it, the fake kubelet's Job handling
and a real `kopf run` process reconciling a custom resource.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml

from tests.support.cluster import ApiError, Cluster, OperatorProcess, b64, wait_for
from tests.support.cluster.kubelet import FakeKubelet

pytestmark = pytest.mark.cluster

BP = "blueprints.esper.dev/v1alpha1"
KN = "kernels.esper.dev/v1alpha1"


def blueprint(name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "esper.dev/v1alpha1",
        "kind": "Blueprint",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"template": {"name": "residual-mlp"}, "targets": ["cpu"], **spec},
    }


def kernel(
    name: str, blueprint: str, target: str = "cpu", owners: list[dict[str, Any]] | None = None
) -> dict:
    meta: dict[str, Any] = {"name": name}
    if owners:
        meta["ownerReferences"] = [
            {
                "apiVersion": "esper.dev/v1alpha1",
                "kind": "Blueprint",
                "name": o["metadata"]["name"],
                "uid": o["metadata"]["uid"],
            }
            for o in owners
        ]
    return {
        "apiVersion": "esper.dev/v1alpha1",
        "kind": "Kernel",
        "metadata": meta,
        "spec": {"blueprint": blueprint, "target": target, "key": "k" * 64},
    }


def job(name: str, script: str, **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": "esper/tezzeret:test",
        "command": ["sh", "-c", script],
    }
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": spec.pop("backoffLimit", 0),
            "template": {"spec": {"restartPolicy": "Never", "containers": [container]}},
            **spec,
        },
    }


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_ and cond["status"] == "True":
            return cond
    return None


# --------------------------------------------------------------------------------------------
# API semantics


def test_metadata_is_filled_and_resource_version_is_global(cluster: Cluster) -> None:
    a = cluster.create(blueprint("a"))
    b = cluster.create(blueprint("b"))
    meta = a["metadata"]
    assert meta["namespace"] == "default"  # from the URL
    assert len(meta["uid"]) == 36 and meta["uid"] != b["metadata"]["uid"]
    assert meta["generation"] == 1
    assert meta["creationTimestamp"].endswith("Z")
    assert int(b["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    assert a["apiVersion"] == "esper.dev/v1alpha1" and a["kind"] == "Blueprint"


def test_generation_counts_spec_changes_only(cluster: Cluster) -> None:
    rv0 = cluster.create(blueprint("a"))["metadata"]["resourceVersion"]
    labelled = cluster.patch(BP, "a", {"metadata": {"labels": {"team": "x"}}})
    assert labelled["metadata"]["generation"] == 1
    status = cluster.patch(BP, "a", {"status": {"phase": "Pending"}}, status=True)
    assert status["metadata"]["generation"] == 1
    spec = cluster.patch(BP, "a", {"spec": {"targets": ["cpu", "cuda-sm90"]}})
    assert spec["metadata"]["generation"] == 2
    assert int(spec["metadata"]["resourceVersion"]) > int(status["metadata"]["resourceVersion"]) > int(rv0)
    noop = cluster.patch(BP, "a", {"spec": {"targets": ["cpu", "cuda-sm90"]}})
    assert noop["metadata"]["resourceVersion"] == spec["metadata"]["resourceVersion"]  # no-op: no write


def test_stale_writes_conflict(cluster: Cluster) -> None:
    old = cluster.create(blueprint("a"))
    cluster.patch(BP, "a", {"spec": {"targets": ["cuda-sm90"]}})
    with pytest.raises(ApiError) as put:
        cluster.replace(old)
    assert put.value.status == 409 and put.value.reason == "Conflict"
    stale = {"metadata": {"resourceVersion": old["metadata"]["resourceVersion"]}, "spec": {"targets": []}}
    with pytest.raises(ApiError) as merge:
        cluster.patch(BP, "a", stale)
    assert merge.value.status == 409
    # kopf guards its JSON patches with a `test` op on resourceVersion and expects 422 on a race.
    test_op = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": old["metadata"]["resourceVersion"]},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x"]},
    ]
    with pytest.raises(ApiError) as jsonpatch:
        cluster.patch(BP, "a", test_op, patch_type="json")
    assert jsonpatch.value.status == 422


def test_create_twice_is_already_exists(cluster: Cluster) -> None:
    cluster.create(blueprint("a"))
    with pytest.raises(ApiError) as exc:
        cluster.create(blueprint("a"))
    body = exc.value.body
    assert exc.value.status == 409
    assert body["kind"] == "Status" and body["reason"] == "AlreadyExists"
    assert body["details"] == {"name": "a", "group": "esper.dev", "kind": "blueprints"}
    with pytest.raises(ApiError) as missing_ns:
        cluster.create(blueprint("b"), namespace="nowhere")
    assert missing_ns.value.status == 404


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("tier=gold", {"a"}),
        ("tier==gold", {"a"}),
        ("tier!=gold", {"b", "c"}),
        ("tier in (gold,silver)", {"a", "b"}),
        ("tier notin (gold)", {"b", "c"}),
        ("tier", {"a", "b"}),
        ("!tier", {"c"}),
        ("tier,app=esper", {"a"}),
    ],
)
def test_label_selectors(cluster: Cluster, selector: str, expected: set[str]) -> None:
    cluster.create(blueprint("a", {"tier": "gold", "app": "esper"}))
    cluster.create(blueprint("b", {"tier": "silver"}))
    cluster.create(blueprint("c", {"app": "esper"}))
    names = {o["metadata"]["name"] for o in cluster.list(BP, label_selector=selector)}
    assert names == expected


def test_field_selectors(cluster: Cluster) -> None:
    cluster.ensure_namespace("other")
    cluster.create(kernel("k1", "bp-a", "cpu"))
    cluster.create(kernel("k2", "bp-b", "cpu"))
    cluster.create(kernel("k3", "bp-a", "cuda-sm90"), namespace="other")
    names = lambda **kw: {o["metadata"]["name"] for o in cluster.list(KN, **kw)}  # noqa: E731
    assert names(field_selector="spec.blueprint=bp-a") == {"k1", "k3"}
    assert names(field_selector="spec.blueprint=bp-a,spec.target!=cpu") == {"k3"}
    assert names(field_selector="metadata.name=k2") == {"k2"}
    assert names(field_selector="metadata.namespace=other") == {"k3"}
    assert {o["metadata"]["name"] for o in cluster.list(KN, "default")} == {"k1", "k2"}
    with pytest.raises(ApiError) as exc:  # not a selectable field of Blueprints: 400, as in k8s
        cluster.list(BP, field_selector="spec.targets=cpu")
    assert exc.value.status == 400


def test_status_subresource_is_separate(cluster: Cluster) -> None:
    created = cluster.create(dict(blueprint("a"), status={"phase": "Forged"}))
    assert "status" not in created  # status is ignored on create
    main = cluster.patch(BP, "a", {"spec": {"targets": ["cuda-sm90"]}, "status": {"phase": "Ignored"}})
    assert "status" not in main and main["spec"]["targets"] == ["cuda-sm90"]
    status = cluster.patch(
        BP, "a", {"spec": {"targets": ["ignored"]}, "status": {"phase": "Ready"}}, status=True
    )
    assert status["status"] == {"phase": "Ready"} and status["spec"]["targets"] == ["cuda-sm90"]
    full = dict(status, spec=dict(status["spec"], targets=["cpu"]), status={"phase": "Ignored"})
    replaced = cluster.replace(full)  # PUT to the main endpoint
    assert replaced["spec"]["targets"] == ["cpu"] and replaced["status"] == {"phase": "Ready"}
    assert replaced["metadata"]["generation"] == 3
    put_status = cluster.replace(dict(replaced, status={"phase": "Failed"}), status=True)
    assert put_status["status"] == {"phase": "Failed"}


def test_list_carries_kind_and_resource_version(cluster: Cluster) -> None:
    cluster.create(blueprint("a"))
    listing = cluster.rest.request("GET", "/apis/esper.dev/v1alpha1/namespaces/default/blueprints")
    assert listing["kind"] == "BlueprintList" and listing["apiVersion"] == "esper.dev/v1alpha1"
    assert int(listing["metadata"]["resourceVersion"]) > 0
    core = cluster.rest.request("GET", "/api/v1")
    assert core["groupVersion"] == "v1"
    assert {"pods", "namespaces", "secrets"} <= {r["name"] for r in core["resources"]}


def _watch(cluster: Cluster, path: str, **params: str) -> list[dict[str, Any]]:
    """Read a watch stream until the server closes it (timeoutSeconds)."""
    http = urllib3.PoolManager()
    query = "&".join(f"{k}={v}" for k, v in params.items())
    rsp = http.request(
        "GET",
        f"{cluster.url}{path}?watch=true&{query}",
        preload_content=False,
        timeout=urllib3.Timeout(read=10),
    )
    assert rsp.headers["Content-Type"].startswith("application/json")
    lines = b"".join(rsp.stream()).splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_watch_honours_resource_version_and_timeout(cluster: Cluster) -> None:
    cluster.create(blueprint("a"))
    rv = cluster.rest.request("GET", "/apis/esper.dev/v1alpha1/blueprints")["metadata"]["resourceVersion"]
    cluster.create(blueprint("b", {"x": "1"}))
    cluster.patch(BP, "a", {"status": {"phase": "Ready"}}, status=True)
    cluster.delete(BP, "b")
    path = "/apis/esper.dev/v1alpha1/namespaces/default/blueprints"
    events = _watch(cluster, path, resourceVersion=rv, timeoutSeconds="1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "b"),
        ("MODIFIED", "a"),
        ("DELETED", "b"),
    ]
    fresh = _watch(cluster, path, timeoutSeconds="1")  # no resourceVersion: the current state first
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in fresh] == [("ADDED", "a")]
    selected = _watch(cluster, path, resourceVersion=rv, timeoutSeconds="1", labelSelector="x%3D1")
    assert [e["type"] for e in selected] == ["ADDED", "DELETED"]


def test_garbage_collection_by_owner_references(cluster: Cluster) -> None:
    a = cluster.create(blueprint("a"))
    b = cluster.create(blueprint("b"))
    cluster.create(kernel("only-a", "a", owners=[a]))
    cluster.create(kernel("shared", "a", owners=[a, b]))
    cluster.delete(BP, "a")
    assert cluster.get(KN, "only-a") is None
    shared = cluster.get(KN, "shared")
    assert shared is not None
    assert [r["name"] for r in shared["metadata"]["ownerReferences"]] == ["b"]  # dangling ref removed
    cluster.delete(BP, "b")
    assert cluster.get(KN, "shared") is None


def test_finalizers_block_deletion(cluster: Cluster) -> None:
    owner = cluster.create(blueprint("a"))
    cluster.create(
        dict(
            kernel("k", "a", owners=[owner]),
            metadata={**kernel("k", "a", owners=[owner])["metadata"], "finalizers": ["esper.dev/x"]},
        )
    )
    cluster.delete(BP, "a")  # GC deletes the Kernel, which waits for its finalizer
    marked = cluster.get(KN, "k")
    assert marked is not None and marked["metadata"]["deletionTimestamp"]
    with pytest.raises(ApiError) as exc:
        cluster.patch(KN, "k", {"metadata": {"finalizers": ["esper.dev/x", "new"]}})
    assert exc.value.status == 422
    cluster.patch(KN, "k", {"metadata": {"finalizers": None}})
    assert cluster.get(KN, "k") is None


def test_job_deletion_policies_and_namespace_reaping(cluster: Cluster) -> None:
    cluster.ensure_namespace("scratch")
    for name in ("orphaning", "cascading"):
        j = cluster.create(job(name, "true"), namespace="scratch")
        cluster.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{name}-pod",
                    "ownerReferences": [
                        {
                            "apiVersion": "batch/v1",
                            "kind": "Job",
                            "name": name,
                            "uid": j["metadata"]["uid"],
                            "controller": True,
                        }
                    ],
                },
                "spec": {"containers": [{"name": "c", "image": "x"}]},
            },
            namespace="scratch",
        )
    cluster.delete("jobs", "orphaning", "scratch", propagation=None)  # batch/v1 default: orphan
    orphan = cluster.get("pods", "orphaning-pod", "scratch")
    assert orphan is not None and "ownerReferences" not in orphan["metadata"]
    cluster.delete("jobs", "cascading", "scratch")  # Background
    assert cluster.get("pods", "cascading-pod", "scratch") is None
    cluster.delete("namespaces", "scratch", None)
    assert cluster.get("namespaces", "scratch", None) is None
    assert cluster.list("pods", "scratch") == []


def test_crd_created_through_the_api_is_served(cluster: Cluster) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget", "shortNames": ["wd"]},
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {}}],
        },
    }
    created = cluster.create(crd)
    assert condition(created, "Established")
    cluster.create({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}})
    assert cluster.get("widgets", "w") is not None
    cluster.delete("customresourcedefinitions", "widgets.example.com", None)
    with pytest.raises(ApiError) as exc:
        cluster.rest.request("GET", "/apis/example.com/v1/namespaces/default/widgets")
    assert exc.value.status == 404


def test_kubernetes_client(cluster: Cluster) -> None:
    import kubernetes

    with cluster.api_client() as api:
        custom = kubernetes.client.CustomObjectsApi(api)
        core = kubernetes.client.CoreV1Api(api)
        batch = kubernetes.client.BatchV1Api(api)
        bp = custom.create_namespaced_custom_object(
            "esper.dev", "v1alpha1", "default", "blueprints", blueprint("a")
        )
        custom.patch_namespaced_custom_object_status(
            "esper.dev", "v1alpha1", "default", "blueprints", "a", {"status": {"phase": "Ready"}}
        )
        got = custom.get_namespaced_custom_object("esper.dev", "v1alpha1", "default", "blueprints", "a")
        assert got["status"]["phase"] == "Ready"
        assert [n.metadata.name for n in core.list_namespace().items] == ["default"]
        owner = kubernetes.client.V1OwnerReference(
            api_version="esper.dev/v1alpha1", kind="Blueprint", name="a", uid=bp["metadata"]["uid"]
        )
        body = job("j", "true")
        body["metadata"]["ownerReferences"] = [api.sanitize_for_serialization(owner)]
        batch.create_namespaced_job("default", body)
        assert batch.read_namespaced_job("j", "default").metadata.owner_references[0].uid == owner.uid
        with pytest.raises(kubernetes.client.ApiException) as exc:
            batch.create_namespaced_job("default", body)
        assert exc.value.status == 409


# --------------------------------------------------------------------------------------------
# The real kubectl


GADGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: gadgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {kind: Gadget, plural: gadgets, singular: gadget, shortNames: [gd]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    - {name: Phase, type: string, jsonPath: .status.phase}
"""


def test_kubectl_workflow(cluster: Cluster, tmp_path: Path) -> None:
    kubectl = cluster.kubectl
    (tmp_path / "crd.yaml").write_text(GADGET_CRD)
    assert "created" in kubectl("apply", "-f", str(tmp_path / "crd.yaml")).stdout
    gadget = {
        "apiVersion": "example.com/v1",
        "kind": "Gadget",
        "metadata": {"name": "g1"},
        "spec": {"size": 3},
    }
    assert "gadget.example.com/g1 created" in kubectl.apply(gadget).stdout
    assert "unchanged" in kubectl.apply(gadget).stdout
    table = kubectl("get", "gadgets").stdout.splitlines()
    assert table[0].split() == ["NAME", "SIZE", "PHASE"] and table[1].split()[:2] == ["g1", "3"]
    as_yaml = yaml.safe_load(kubectl("get", "gd", "g1", "-o", "yaml").stdout)
    assert as_yaml["spec"] == {"size": 3} and as_yaml["metadata"]["uid"]
    kubectl("label", "gadgets", "g1", "tier=gold")
    assert "g1" in kubectl("get", "gadgets", "-l", "tier=gold", "-o", "name").stdout
    assert "No resources found" in kubectl("get", "gadgets", "-l", "tier=silver").stderr
    kubectl(
        "patch", "gadget", "g1", "--subresource=status", "--type=merge", "-p", '{"status":{"phase":"Ready"}}'
    )
    assert kubectl("get", "gadget", "g1", "-o", "jsonpath={.status.phase}").stdout == "Ready"
    current = kubectl.get_json("gadget", "g1")
    current["spec"]["size"] = 5
    kubectl("replace", "-f", "-", input=json.dumps(current))
    assert kubectl.get_json("gadget", "g1")["metadata"]["generation"] == 2
    assert "deleted" in kubectl("delete", "gadget", "g1").stdout
    assert kubectl("get", "gadget", "g1", check=False).returncode != 0
    # Esper's own CRDs print their columns; core resources are discoverable.
    kubectl.apply(blueprint("bp1"))
    header = kubectl("get", "bp").stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "KERNELS", "SERVING", "TEMPLATE", "AGE"]
    assert "default" in kubectl("get", "namespaces").stdout


def test_kubectl_watch_sees_added(cluster: Cluster) -> None:
    watcher = cluster.kubectl.popen("get", "blueprints", "-w", "-o", "name")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(watcher.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        cluster.create(blueprint("watched"))
        wait_for(lambda: any("watched" in line for line in lines), timeout=10)
    finally:
        watcher.terminate()
        watcher.wait(5)


# --------------------------------------------------------------------------------------------
# The fake kubelet


def test_kubelet_runs_a_job_to_completion(cluster: Cluster, kubelet: FakeKubelet) -> None:
    cluster.create(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}, "data": {"key": b64("sekret")}}
    )
    env = [
        {"name": "PLAIN", "value": "v"},
        {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "key"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    script = (
        'echo hello; printf \'{"ok":true,"env":"%s/%s/%s"}\' "$PLAIN" "$SECRET" "$NS" > "$ESPER_RESULT_PATH"'
    )
    j = cluster.create(job("compile", script, container={"env": env}))
    done = wait_for(
        lambda: condition(cluster.get("jobs", "compile"), "Complete") and cluster.get("jobs", "compile")
    )
    assert done["status"]["succeeded"] == 1 and done["status"]["completionTime"]
    assert condition(done, "SuccessCriteriaMet")
    (pod,) = cluster.list("pods", label_selector="job-name=compile")
    assert pod["metadata"]["labels"]["controller-uid"] == j["metadata"]["uid"]
    assert pod["metadata"]["ownerReferences"][0]["uid"] == j["metadata"]["uid"]
    assert pod["status"]["phase"] == "Succeeded"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    assert json.loads(terminated["message"]) == {"ok": True, "env": "v/sekret/default"}
    assert kubelet.runs_of("compile")[0].env["POD"] == pod["metadata"]["name"]
    assert cluster.kubectl("logs", pod["metadata"]["name"]).stdout == "hello\n"


def test_kubelet_backoff_then_fail(cluster: Cluster, kubelet: FakeKubelet) -> None:
    cluster.create(
        job(
            "flaky",
            "echo boom; exit 3",
            backoffLimit=2,
            container={"terminationMessagePolicy": "FallbackToLogsOnError"},
        )
    )
    failed = wait_for(
        lambda: condition(cluster.get("jobs", "flaky"), "Failed") and cluster.get("jobs", "flaky")
    )
    assert condition(failed, "Failed")["reason"] == "BackoffLimitExceeded"
    assert condition(failed, "FailureTarget")
    assert failed["status"]["failed"] == 3
    pods = cluster.list("pods", label_selector="batch.kubernetes.io/job-name=flaky")
    assert len(pods) == 3 and {p["status"]["phase"] for p in pods} == {"Failed"}
    terminated = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated == terminated | {"exitCode": 3, "reason": "Error", "message": "boom\n"}


POLICY = {
    "rules": [
        {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [65, 66, 67]}},
        {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [75]}},
    ]
}


def test_kubelet_pod_failure_policy(cluster: Cluster, kubelet: FakeKubelet) -> None:
    cluster.create(
        job(
            "invalid",
            'echo \'{"error":{"code":65}}\' > $ESPER_RESULT_PATH; exit 65',
            backoffLimit=5,
            podFailurePolicy=POLICY,
        )
    )
    failed = wait_for(lambda: condition(cluster.get("jobs", "invalid"), "Failed"))
    assert failed["reason"] == "PodFailurePolicy" and "exit code 65" in failed["message"]
    assert len(kubelet.runs_of("invalid")) == 1
    # An ignored failure (injected) does not count; the retry succeeds.
    kubelet.fail_next("transient", exit_code=75, reason="Error")
    cluster.create(job("transient", "exit 0", backoffLimit=0, podFailurePolicy=POLICY))
    wait_for(lambda: condition(cluster.get("jobs", "transient"), "Complete"))
    assert "failed" not in cluster.get("jobs", "transient")["status"]
    assert [r.exit_code for r in kubelet.runs_of("transient")] == [75, 0]


def test_kubelet_injected_oom_and_deadline(cluster: Cluster, kubelet: FakeKubelet) -> None:
    kubelet.fail_next("oom", exit_code=137, reason="OOMKilled")
    cluster.create(job("oom-1", "exit 0"))
    wait_for(lambda: condition(cluster.get("jobs", "oom-1"), "Failed"))
    (pod,) = cluster.list("pods", label_selector="job-name=oom-1")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (137, "OOMKilled")
    cluster.create(job("slow", "sleep 30", activeDeadlineSeconds=1, backoffLimit=3))
    failed = wait_for(lambda: condition(cluster.get("jobs", "slow"), "Failed"), timeout=10)
    assert failed["reason"] == "DeadlineExceeded"
    assert len(kubelet.runs_of("slow")) == 1


def test_kubelet_pause_parallelism_and_deletion(
    cluster: Cluster, kubelet: FakeKubelet, tmp_path: Path
) -> None:
    kubelet.paused = True
    kubelet.max_parallel = 1
    gate = tmp_path / "go"
    wait_script = f"echo $$ > {tmp_path}/$JOB.pid; while [ ! -f {gate} ]; do sleep 0.05; done"
    for name in ("first", "second"):
        cluster.create(job(name, wait_script, container={"env": [{"name": "JOB", "value": name}]}))
    wait_for(lambda: len(kubelet.seen_jobs()) == 2)
    assert cluster.list("pods") == []  # paused: accepted, not started
    kubelet.paused = False
    wait_for(lambda: (tmp_path / "first.pid").exists() or (tmp_path / "second.pid").exists())
    assert len(cluster.list("pods")) == 1  # max_parallel=1
    running = "first" if (tmp_path / "first.pid").exists() else "second"
    pid = int(wait_for(lambda: (tmp_path / f"{running}.pid").read_text().strip()))
    cluster.delete("jobs", running)  # deleted while running: the process is killed

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, timeout=5)
    other = "second" if running == "first" else "first"
    wait_for(lambda: (tmp_path / f"{other}.pid").exists())
    gate.touch()
    wait_for(lambda: condition(cluster.get("jobs", other), "Complete"))


# --------------------------------------------------------------------------------------------
# A real kopf process


OPERATOR = """
import kopf

@kopf.on.startup()
def configure(settings, **_):
    settings.watching.server_timeout = 30

@kopf.on.create("esper.dev", "v1alpha1", "blueprints")
@kopf.on.update("esper.dev", "v1alpha1", "blueprints", field="spec")
def reconcile(spec, meta, patch, **_):
    patch.status["phase"] = "Seen"
    patch.status["targets"] = len(spec.get("targets", []))
    patch.status["observedGeneration"] = meta["generation"]
"""


def test_real_kopf_operator_reconciles(cluster: Cluster, operator_process: Any, tmp_path: Path) -> None:
    path = tmp_path / "operator.py"
    path.write_text(textwrap.dedent(OPERATOR))
    op: OperatorProcess = operator_process(path)
    cluster.create(blueprint("a", targets=["cpu", "cuda-sm90"]))
    seen = wait_for(
        lambda: (cluster.get(BP, "a").get("status") or {}).get("phase") == "Seen" and cluster.get(BP, "a"),
        timeout=30,
        message=lambda: op.log()[-3000:],
    )
    assert seen["status"]["targets"] == 2 and seen["status"]["observedGeneration"] == 1
    assert "kopf.zalando.org/last-handled-configuration" in seen["metadata"]["annotations"]
    op.restart()
    cluster.patch(BP, "a", {"spec": {"targets": ["cpu"]}})
    wait_for(
        lambda: cluster.get(BP, "a")["status"].get("observedGeneration") == 2,
        timeout=30,
        message=lambda: op.log()[-3000:],
    )
    assert cluster.get(BP, "a")["status"]["targets"] == 1
    assert op.stop() is not None and not op.running
    assert "Traceback" not in op.log()


def test_cluster_is_usable_without_fixtures(tmp_path: Path) -> None:
    with Cluster(tmp_path / "c") as c, subprocess.Popen(["true"]) as p:
        assert c.kubectl("get", "ns", "default", "-o", "name").stdout.strip() == "namespace/default"
        p.wait()
