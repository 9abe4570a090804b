"""The sidecar injector: every workload kind, idempotence, schema validity (Kubernetes 1.32), refusals."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml

from esper.sidecar.inject import SIDECAR, VOLUME, inject, inject_documents

IMAGE = "ghcr.io/esper/esper:0.1.0"
KERNEL = "cpu-0123456789abcdef"


def _template() -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app": "train"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {"name": "train", "image": "python:3.11", "command": ["python", "train.py"]},
                {
                    "name": "logger",
                    "image": "busybox:1.36",
                    "volumeMounts": [{"name": "data", "mountPath": "/d"}],
                },
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }


def _workload(kind: str) -> dict[str, Any]:
    t = _template()
    selector = {"matchLabels": {"app": "train"}}
    always = copy.deepcopy(t)
    always["spec"]["restartPolicy"] = "Always"
    meta = {"name": f"{kind.lower()}-x", "namespace": "ml"}
    return {
        "Pod": {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": t["spec"]},
        "Job": {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {"template": t}},
        "CronJob": {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": meta,
            "spec": {"schedule": "0 * * * *", "jobTemplate": {"spec": {"template": t}}},
        },
        "Deployment": {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {"selector": selector, "template": always},
        },
        "StatefulSet": {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": meta,
            "spec": {"selector": selector, "serviceName": "x", "template": always},
        },
        "DaemonSet": {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": meta,
            "spec": {"selector": selector, "template": always},
        },
        "ReplicaSet": {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": meta,
            "spec": {"selector": selector, "template": always},
        },
    }[kind]


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


KINDS = ["Pod", "Job", "CronJob", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_gets_the_native_sidecar_and_validates(kind: str) -> None:
    original = _workload(kind)
    before = copy.deepcopy(original)
    out = inject(original, image=IMAGE, kernels=[KERNEL], store_uri="s3://bucket/esper")
    assert original == before, "the input must not be modified"
    kubernetes_validate.validate(out, "1.32.0", strict=True)

    spec = _pod_spec(out)
    sidecar = spec["initContainers"][0]
    assert sidecar["name"] == SIDECAR and sidecar["restartPolicy"] == "Always"
    assert sidecar["command"] == ["esper", "kasmina", "sync"]
    env = {e["name"]: e for e in sidecar["env"]}
    assert env["ESPER_KERNELS"]["value"] == KERNEL
    assert env["ESPER_STORE_URI"]["value"] == "s3://bucket/esper"
    assert env["ESPER_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    sc = sidecar["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
    assert {"name": VOLUME, "emptyDir": {"sizeLimit": "8Gi"}} in spec["volumes"]  # a node's disk is shared
    assert {"name": "esper-trusted-keys", "configMap": {"name": "esper-trusted-keys"}} in spec["volumes"]
    assert env["ESPER_TRUSTED_KEYS"]["value"] == "/etc/esper/trusted-keys"
    for c in spec["containers"]:
        assert {"name": VOLUME, "mountPath": "/var/lib/esper/kernels", "readOnly": True} in c["volumeMounts"]
        assert {"name": "ESPER_KERNEL_DIR", "value": "/var/lib/esper/kernels"} in c["env"]
    assert spec["containers"][1]["volumeMounts"][0] == {"name": "data", "mountPath": "/d"}  # kept


@pytest.mark.parametrize("kind", KINDS)
def test_injecting_twice_changes_nothing(kind: str) -> None:
    kwargs: dict[str, Any] = {"image": IMAGE, "selector": "esper.dev/blueprint=mlp", "kernel_dir": "/kernels"}
    once = inject(_workload(kind), **kwargs)
    assert inject(once, **kwargs) == once


def test_reinjecting_with_new_settings_updates_the_sidecar_in_place() -> None:
    once = inject(_workload("Pod"), image=IMAGE, kernels="a,b")
    twice = inject(once, image="esper:2", kernels=["c"])
    inits = twice["spec"]["initContainers"]
    assert len(inits) == 1 and inits[0]["image"] == "esper:2"
    assert {"name": "ESPER_KERNELS", "value": "c"} in inits[0]["env"]


def test_selector_only_and_service_account() -> None:
    out = inject(_workload("Job"), image=IMAGE, selector="team=ml", service_account="trainer")
    spec = _pod_spec(out)
    env = {e["name"]: e.get("value") for e in spec["initContainers"][0]["env"]}
    assert env["ESPER_KERNEL_SELECTOR"] == "team=ml" and "ESPER_KERNELS" not in env
    assert spec["serviceAccountName"] == "trainer"
    kubernetes_validate.validate(out, "1.32.0", strict=True)


def test_automount_off_gets_a_token_for_the_sidecar_only() -> None:
    doc = _workload("Pod")
    doc["spec"]["automountServiceAccountToken"] = False
    out = inject(doc, image=IMAGE, kernels=[KERNEL])
    kubernetes_validate.validate(out, "1.32.0", strict=True)
    spec = out["spec"]
    assert any(v["name"] == "esper-kasmina-token" and "projected" in v for v in spec["volumes"])
    mounts = [m["mountPath"] for m in spec["initContainers"][0]["volumeMounts"]]
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in mounts
    assert all(m["name"] != "esper-kasmina-token" for c in spec["containers"] for m in c["volumeMounts"])
    assert inject(out, image=IMAGE, kernels=[KERNEL]) == out


def test_existing_init_containers_run_after_the_sidecar() -> None:
    doc = _workload("Pod")
    doc["spec"]["initContainers"] = [{"name": "fetch-data", "image": "busybox:1.36"}]
    out = inject(doc, image=IMAGE, kernels=[KERNEL])
    assert [c["name"] for c in out["spec"]["initContainers"]] == [SIDECAR, "fetch-data"]
    kubernetes_validate.validate(out, "1.32.0", strict=True)


@pytest.mark.parametrize(
    ("mutate", "kwargs", "message"),
    [
        (lambda d: d.update(kind="Service"), {}, "cannot inject into kind 'Service'"),
        (lambda d: d["spec"].update(containers=[]), {}, "no containers"),
        (lambda d: d.pop("spec"), {}, "no pod template spec"),
        (
            lambda d: d["spec"]["volumes"].append({"name": VOLUME, "configMap": {"name": "x"}}),
            {},
            "already exists and is not an emptyDir",
        ),
        (
            lambda d: d["spec"]["containers"][0].update(
                volumeMounts=[{"name": "data", "mountPath": "/var/lib/esper/kernels"}]
            ),
            {},
            "already mounts",
        ),
        (
            lambda d: d["spec"].update(serviceAccountName="other"),
            {"service_account": "trainer"},
            "serviceAccountName is 'other'",
        ),
        (lambda d: None, {"kernels": None}, "nothing to sync"),
        (lambda d: None, {"kernels": ["Bad_Name"]}, "not Kubernetes object names"),
        (lambda d: None, {"kernel_dir": "relative"}, "must be an absolute path"),
    ],
)
def test_refusals(mutate: Any, kwargs: dict[str, Any], message: str) -> None:
    doc = _workload("Pod")
    mutate(doc)
    args: dict[str, Any] = {"image": IMAGE, "kernels": [KERNEL], **kwargs}
    with pytest.raises(ValueError, match=message):
        inject(doc, **args)


def test_static_s3_credentials_are_a_read_only_secret_reference() -> None:
    """MinIO or any static-key S3: the sidecar gets the endpoint, region and a Secret reference (a
    read-only key); with no Secret (workload identity) no credential variable is set at all."""
    out = inject(
        _workload("Pod"),
        image=IMAGE,
        kernels=[KERNEL],
        s3_endpoint="http://minio.minio:9000",
        s3_region="eu-west-1",
        credentials_secret="esper-s3-readonly",
    )
    env = {e["name"]: e for e in _pod_spec(out)["initContainers"][0]["env"]}
    assert env["ESPER_S3_ENDPOINT"]["value"] == "http://minio.minio:9000"
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[var] == {
            "name": var,
            "valueFrom": {"secretKeyRef": {"name": "esper-s3-readonly", "key": var}},
        }
    for c in _pod_spec(out)["containers"]:  # the trainer holds no bucket credentials
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & {e["name"] for e in c.get("env", [])}
    plain = inject(_workload("Pod"), image=IMAGE, kernels=[KERNEL])
    names = {e["name"] for e in _pod_spec(plain)["initContainers"][0]["env"]}
    assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "ESPER_S3_ENDPOINT"}
    with pytest.raises(ValueError, match="not a Kubernetes object name"):
        inject(_workload("Pod"), image=IMAGE, kernels=[KERNEL], credentials_secret="Bad_Name")
    with pytest.raises(ValueError, match="not a quantity"):
        inject(_workload("Pod"), image=IMAGE, kernels=[KERNEL], volume_size_limit="8Gi\n")


def test_an_existing_empty_dir_of_that_name_is_reused() -> None:
    doc = _workload("Pod")
    doc["spec"]["volumes"].append({"name": VOLUME, "emptyDir": {"sizeLimit": "1Gi"}})
    out = inject(doc, image=IMAGE, kernels=[KERNEL])
    assert [v for v in out["spec"]["volumes"] if v["name"] == VOLUME] == [
        {"name": VOLUME, "emptyDir": {"sizeLimit": "1Gi"}}
    ]


def test_multi_document_yaml() -> None:
    service = (
        "# a comment kept verbatim\napiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
        "spec:\n  ports: [{port: 80}]\n"
    )
    text = "\n---\n".join(
        [service.rstrip("\n"), yaml.safe_dump(_workload("Deployment")), yaml.safe_dump(_workload("Job"))]
    )
    out = inject_documents(text, image=IMAGE, kernels=[KERNEL])
    assert out.startswith(service)  # non-workload documents pass through byte for byte
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["Service", "Deployment", "Job"]
    for d in docs[1:]:
        assert _pod_spec(d)["initContainers"][0]["name"] == SIDECAR
        kubernetes_validate.validate(d, "1.32.0", strict=True)
    assert inject_documents(out, image=IMAGE, kernels=[KERNEL]) == out  # idempotent on text too


def test_multi_document_list_kind_and_errors() -> None:
    listing = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [_workload("Pod"), {"apiVersion": "v1", "kind": "ConfigMap"}],
    }
    out = list(yaml.safe_load_all(inject_documents(yaml.safe_dump(listing), image=IMAGE, kernels=[KERNEL])))
    assert out[0]["items"][0]["spec"]["initContainers"][0]["name"] == SIDECAR
    assert out[0]["items"][1] == {"apiVersion": "v1", "kind": "ConfigMap"}
    bad = _workload("Pod")
    bad["spec"]["containers"] = []
    with pytest.raises(ValueError, match="no containers"):
        inject_documents(yaml.safe_dump(bad), image=IMAGE, kernels=[KERNEL])


def test_targets_limit_the_sidecar_to_their_kernels() -> None:
    """A CPU pool of AVX2 and AVX-512 nodes asks for cpu and cpu-avx512 Kernels, not CUDA ones: the
    sidecar's own config reads the injected env, and its sync filter then drops the other targets'."""
    from esper.sidecar.config import SyncConfig
    from esper.sidecar.sync import desired_of

    def kernel(target: str) -> dict[str, Any]:
        artifact = {"uri": f"s3://bucket/kernels/{'a' * 64}", "sha256": "b" * 64, "size": 10}
        return {
            "metadata": {"name": f"{target}-aaaa", "namespace": "ml"},
            "spec": {"target": target, "key": "a" * 64, "blueprint": "mlp"},
            "status": {"phase": "Ready", "artifact": artifact},
        }

    everything = ("cpu", "cpu-avx512", "cuda-sm90")
    for targets, env_value, synced in [
        ("cpu-avx512", "cpu-avx512", ["cpu-avx512"]),
        (["cpu", "cpu-avx512", "cpu"], "cpu,cpu-avx512", ["cpu", "cpu-avx512"]),  # duplicates dropped
        (" cpu , cpu-avx512 ", "cpu,cpu-avx512", ["cpu", "cpu-avx512"]),
        ((), None, list(everything)),
    ]:
        out = inject(_workload("Pod"), image=IMAGE, selector="esper.dev/blueprint=mlp", targets=targets)
        kubernetes_validate.validate(out, "1.32.0", strict=True)
        env = {e["name"]: e["value"] for e in out["spec"]["initContainers"][0]["env"] if "value" in e}
        assert env.get("ESPER_TARGET") == env_value, targets
        del env["ESPER_TRUSTED_KEYS"]  # a ConfigMap's mount path, absent here
        config = SyncConfig.from_env(env)
        assert [t for t in everything if desired_of(kernel(t), "ml", config.targets)] == synced, targets
    with pytest.raises(ValueError, match=r"invalid target 'avx512'.*'cpu-avx512'"):
        inject(_workload("Pod"), image=IMAGE, selector="esper.dev/blueprint=mlp", targets="cpu,avx512")


def test_the_cli_passes_the_targets_and_refuses_a_bad_one(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from esper.cli.main import app

    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(_workload("Pod")))
    args = ["kasmina", "inject", str(path), "--blueprint", "mlp", "--target"]
    ok = CliRunner().invoke(app, [*args, "cpu,cpu-avx512"])
    assert ok.exit_code == 0, ok.output
    env = yaml.safe_load(ok.stdout)["spec"]["initContainers"][0]["env"]
    assert {"name": "ESPER_TARGET", "value": "cpu,cpu-avx512"} in env
    bad = CliRunner().invoke(app, [*args, "tpu"])
    assert bad.exit_code == 1 and "invalid target 'tpu'" in bad.output
