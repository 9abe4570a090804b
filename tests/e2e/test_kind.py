"""End to end on a real kind cluster: helm install, a Blueprint becomes a Ready Kernel in MinIO, and a
training pod with the injected Kasmina sidecar receives it.

Needs `kind`, `docker`, `kubectl` and `helm` on PATH; skips itself otherwise (the build machines have no
Docker). Uses an existing cluster named by ESPER_KIND_CLUSTER, or creates `esper-e2e` and deletes it.
ESPER_E2E_IMAGE names an image already built (CI builds it with a layer cache); otherwise the test
builds `operator/Dockerfile`. Either way it is loaded into the cluster's nodes.

    pytest tests/e2e -m kind
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.kind

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("kind", "docker", "kubectl", "helm")
IMAGE = os.environ.get("ESPER_E2E_IMAGE", "ghcr.io/esper-dev/esper:e2e")
BLUEPRINT = "residual-mlp-64"  # examples/blueprint.yaml
# examples/cluster/minio.yaml's root credentials; the Secret below carries them.
S3_ENDPOINT = "http://minio.minio:9000"
S3_SECRET = "esper-s3"


def _missing() -> list[str]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if "docker" not in missing and subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        missing.append("a running Docker engine")
    return missing


if missing := _missing():
    pytest.skip(f"kind end-to-end tests need {', '.join(missing)}", allow_module_level=True)


def sh(*args: str, check: bool = True, timeout: float = 900, input: str | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def kind_cluster() -> Iterator[str]:
    name = os.environ.get("ESPER_KIND_CLUSTER")
    created = name is None
    name = name or "esper-e2e"
    if created:
        sh("kind", "create", "cluster", "--name", name, "--wait", "120s")
    if "ESPER_E2E_IMAGE" not in os.environ:
        sh("docker", "build", "-f", "operator/Dockerfile", "-t", IMAGE, ".", timeout=1800)
    sh("kind", "load", "docker-image", IMAGE, "--name", name)
    sh("kubectl", "config", "use-context", f"kind-{name}")
    sh("kubectl", "apply", "-f", "examples/cluster/minio.yaml")
    sh("kubectl", "-n", "minio", "wait", "--for=condition=complete", "job/make-bucket", "--timeout=300s")
    yield name
    if created:
        sh("kind", "delete", "cluster", "--name", name, check=False)


@pytest.fixture(scope="module")
def esper(kind_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The chart installed in a fresh namespace (also where the Blueprint and trainer go), with a new
    signing key pair and MinIO's read-only user for the sidecar."""
    from esper.signing import generate_key_pair

    namespace = f"esper-{uuid.uuid4().hex[:6]}"
    private, public = generate_key_pair(tmp_path_factory.mktemp("signing"))
    repository, tag = IMAGE.rsplit(":", 1)
    sh("kubectl", "create", "namespace", namespace)
    sh(
        "kubectl", "-n", namespace, "create", "secret", "generic", S3_SECRET,
        "--from-literal=AWS_ACCESS_KEY_ID=esper", "--from-literal=AWS_SECRET_ACCESS_KEY=esper-secret",
    )  # fmt: skip
    sh(
        "helm", "install", "esper", "charts/esper", "-n", namespace, "--wait", "--timeout", "300s",
        "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=Never",  # the image exists only on the nodes (kind load)
        "--set", f"s3.endpoint={S3_ENDPOINT}", "--set", f"s3.existingSecret={S3_SECRET}",
        "--set", f"operator.watchNamespace={namespace}",
        "--set-file", f"signing.privateKey={private}", "--set-file", f"signing.publicKeys[0]={public}",
        "--set", f"kasmina.namespaces={{{namespace}}}",
        "--set", "kasmina.s3.accessKeyId=esper-ro", "--set", "kasmina.s3.secretAccessKey=esper-ro-secret",
    )  # fmt: skip
    yield namespace
    sh("helm", "uninstall", "esper", "-n", namespace, check=False)
    sh("kubectl", "delete", "namespace", namespace, "--wait=false", check=False)


def _trainer_manifest() -> str:
    """examples/training-pod.yaml with the trainer on the image under test (the example names a
    released tag, which the nodes do not have)."""
    docs = list(yaml.safe_load_all((REPO / "examples/training-pod.yaml").read_text()))
    pod = next(d for d in docs if d and d["kind"] == "Pod")
    for container in pod["spec"]["containers"]:
        container["image"] = IMAGE
    return yaml.safe_dump_all(docs)


def _wait_until_gone(ns: str, kind: str, selector: str, timeout: float) -> list[str]:
    """Poll until no object of `kind` matches `selector`; what is left at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = sh("kubectl", "-n", ns, "get", kind, "-l", selector, "-o", "name").split()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(2)


def test_blueprint_to_ready_kernel_to_training_pod(esper: str) -> None:
    ns = esper
    sh("kubectl", "-n", ns, "apply", "-f", "examples/blueprint.yaml")
    sh(
        "kubectl", "-n", ns, "wait", "--for=jsonpath={.status.phase}=Ready", f"blueprint/{BLUEPRINT}",
        "--timeout=900s", timeout=960,
    )  # fmt: skip
    kernels = json.loads(sh("kubectl", "-n", ns, "get", "kernels", "-o", "json"))["items"]
    assert [(k["spec"]["blueprint"], k["spec"]["target"], k["status"]["phase"]) for k in kernels] == [
        (BLUEPRINT, "cpu", "Ready")
    ]

    injected = sh(
        sys.executable, "-m", "esper.cli.main", "kasmina", "inject", "-",
        "--blueprint", BLUEPRINT, "--image", IMAGE,
        "--s3-endpoint", S3_ENDPOINT, "--s3-region", "us-east-1", "--credentials-secret", "esper-s3-readonly",
        input=_trainer_manifest(),
    )  # fmt: skip
    sh("kubectl", "-n", ns, "apply", "-f", "-", input=injected)
    # Ready only once the sidecar's startup probe saw its first sync complete.
    sh("kubectl", "-n", ns, "wait", "--for=condition=Ready", "pod/esper-trainer", "--timeout=600s")
    index = json.loads(
        sh("kubectl", "-n", ns, "exec", "esper-trainer", "-c", "trainer", "--",
           "cat", "/var/lib/esper/kernels/index.json")
    )  # fmt: skip
    assert [(e["name"], e["blueprint"], e["key"]) for e in index["kernels"]] == [
        (kernels[0]["metadata"]["name"], BLUEPRINT, kernels[0]["spec"]["key"])
    ]

    sh("kubectl", "-n", ns, "delete", "pod", "esper-trainer", "--timeout=120s")
    sh("kubectl", "-n", ns, "delete", "-f", "examples/blueprint.yaml", "--timeout=120s")
    # The Kernel goes by garbage collection once its last owner is gone: asynchronous.
    assert _wait_until_gone(ns, "kernels", f"blueprint.esper.dev/{BLUEPRINT}", timeout=180) == []
