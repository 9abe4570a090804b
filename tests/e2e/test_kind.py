"""End to end on a real kind cluster: helm install, a Blueprint becomes a Ready Kernel in MinIO, and a
training pod with the injected Kasmina sidecar receives it.

Needs `kind`, `docker`, `kubectl` and `helm` on PATH; skips itself otherwise (the build machines have no
Docker). Uses an existing cluster named by ESPER_KIND_CLUSTER, or creates `esper-e2e` and deletes it.

    pytest tests/e2e -m kind
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.kind

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("kind", "docker", "kubectl", "helm")
IMAGE = "ghcr.io/esper-dev/esper:e2e"


def _missing() -> list[str]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if "docker" not in missing and subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        missing.append("a running Docker engine")
    return missing


if _missing():
    pytest.skip(f"kind end-to-end tests need {', '.join(_missing())}", allow_module_level=True)


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
    sh("docker", "build", "-f", "operator/Dockerfile", "-t", IMAGE, ".", timeout=1800)
    sh("kind", "load", "docker-image", IMAGE, "--name", name)
    sh("kubectl", "config", "use-context", f"kind-{name}")
    sh("kubectl", "apply", "-f", "examples/cluster/minio.yaml")
    sh("kubectl", "-n", "minio", "wait", "--for=condition=complete", "job/make-bucket", "--timeout=300s")
    yield name
    if created:
        sh("kind", "delete", "cluster", "--name", name, check=False)


@pytest.fixture(scope="module")
def esper(kind_cluster: str) -> Iterator[str]:
    namespace = f"esper-{uuid.uuid4().hex[:6]}"
    sh("kubectl", "create", "namespace", namespace)
    sh(
        "kubectl",
        "-n",
        namespace,
        "create",
        "secret",
        "generic",
        "esper-s3",
        "--from-literal=AWS_ACCESS_KEY_ID=esper",
        "--from-literal=AWS_SECRET_ACCESS_KEY=esper-secret",
    )
    sh(
        "helm",
        "install",
        "esper",
        "charts/esper",
        "-n",
        namespace,
        "--wait",
        "--timeout",
        "300s",
        "--set",
        f"image.repository={IMAGE.split(':')[0]}",
        "--set",
        "image.tag=e2e",
        "--set",
        "image.pullPolicy=Never",
        "--set",
        "s3.endpoint=http://minio.minio:9000",
        "--set",
        "s3.existingSecret=esper-s3",
        "--set",
        "operator.watchNamespace=" + namespace,
    )
    yield namespace
    sh("helm", "uninstall", "esper", "-n", namespace, check=False)
    sh("kubectl", "delete", "namespace", namespace, "--wait=false", check=False)


def test_blueprint_to_ready_kernel_to_training_pod(esper: str) -> None:
    ns = esper
    sh("kubectl", "-n", ns, "apply", "-f", "examples/blueprint.yaml")
    sh(
        "kubectl",
        "-n",
        ns,
        "wait",
        "--for=jsonpath={.status.phase}=Ready",
        "blueprint/residual-mlp-64",
        "--timeout=900s",
    )
    kernels = sh("kubectl", "-n", ns, "get", "kernels")
    assert "Ready" in kernels and "residual-mlp-64" in kernels
    injected = sh(
        "python",
        "-m",
        "esper.cli.main",
        "kasmina",
        "inject",
        "examples/training-pod.yaml",
        "--selector",
        "esper.dev/blueprint=residual-mlp-64",
        "--image",
        IMAGE,
    )
    sh("kubectl", "-n", ns, "apply", "-f", "-", input=injected)
    sh("kubectl", "-n", ns, "wait", "--for=condition=Ready", "pod/esper-trainer", "--timeout=600s")
    index = sh(
        "kubectl",
        "-n",
        ns,
        "exec",
        "esper-trainer",
        "-c",
        "trainer",
        "--",
        "cat",
        "/var/lib/esper/kernels/index.json",
    )
    assert "residual-mlp-64" in index
    sh("kubectl", "-n", ns, "delete", "-f", "examples/blueprint.yaml", "--timeout=120s")
    assert sh("kubectl", "-n", ns, "get", "kernels", "-o", "name").strip() == ""
