"""Injected training jobs against a real API server (the test cluster's `real_apiserver`: by default
`../shared/k8s`, apiextensions-apiserver + etcd).

The CRDs of PyTorchJob, TrainingRuntime and TrainJob carry Kubernetes' own PodTemplateSpec schema
(`tests.support.kubeflow_crds`), and every apply uses strict field validation: the server checks the
injected sidecar, volume and mounts as it would a Pod's, and refuses any field a pod template does
not have. The objects are read back to show that nothing was pruned. Skipped where the machine has
no real server or no kubectl.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from esper.sidecar.inject import SIDECAR, VOLUME, inject_documents
from tests.support.kubeflow_crds import all_crds

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"PyTorchJob": "pytorchjobs", "TrainingRuntime": "trainingruntimes", "TrainJob": "trainjobs"}
NS = "default"  # exists on a full API server too
pytestmark = [
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed"),
    pytest.mark.timeout(180),
]


class Kubectl:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __call__(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["kubectl", *args], input=stdin, env=self.env, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc


@pytest.fixture(scope="module")
def kubectl(real_apiserver: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kubectl]:
    cache = tmp_path_factory.mktemp("kube-cache")
    k = Kubectl({**os.environ, "KUBECONFIG": str(real_apiserver.kubeconfig), "KUBECACHEDIR": str(cache)})
    crds = yaml.safe_dump_all(all_crds())
    k("apply", "--server-side", "-f", "-", stdin=crds)
    try:
        k("wait", "--for=condition=Established", *[f"crd/{p}.{g}" for p, g in (
            ("pytorchjobs", "kubeflow.org"), ("trainingruntimes", "trainer.kubeflow.org"),
            ("trainjobs", "trainer.kubeflow.org"))], "--timeout=60s")  # fmt: skip
        yield k
    finally:
        k("delete", "--wait=false", "-f", "-", stdin=crds, check=False)  # the server is the session's


def _training_docs(example: str) -> list[dict[str, Any]]:
    text = inject_documents((ROOT / "examples" / example).read_text(), image="ghcr.io/esper-dev/esper:0.1.0",
                            selector="esper.dev/blueprint=residual-mlp-64")  # fmt: skip
    return [d for d in yaml.safe_load_all(text) if isinstance(d, dict) and d.get("kind") in KINDS]


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    if obj["kind"] == "TrainingRuntime":
        return [
            j["template"]["spec"]["template"]["spec"]
            for j in obj["spec"]["template"]["spec"]["replicatedJobs"]
        ]
    return []


@pytest.mark.parametrize(("example", "expected"), [
    ("pytorchjob.yaml", {"PyTorchJob": 2}),
    ("trainjob.yaml", {"TrainingRuntime": 1, "TrainJob": 0}),
])  # fmt: skip
def test_injected_training_jobs_are_admitted_and_keep_every_sidecar(
    kubectl: Kubectl, example: str, expected: dict[str, int]
) -> None:
    docs = _training_docs(example)
    assert sorted(d["kind"] for d in docs) == sorted(expected)
    kubectl(
        "apply", "--server-side", "--validate=strict", "-n", NS, "-f", "-", stdin=yaml.safe_dump_all(docs)
    )
    for doc in docs:
        got = json.loads(
            kubectl("get", KINDS[doc["kind"]], doc["metadata"]["name"], "-n", NS, "-o", "json").stdout
        )
        specs = _pod_specs(got)
        assert len(specs) == expected[doc["kind"]]  # every replica's pod template
        for spec in specs:
            sidecar = spec["initContainers"][0]
            assert sidecar["name"] == SIDECAR and sidecar["restartPolicy"] == "Always"
            assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"  # nested fields survived
            assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
            assert {"name": VOLUME, "emptyDir": {"sizeLimit": "8Gi"}} in spec["volumes"]
            mounts = spec["containers"][0]["volumeMounts"]
            assert {"name": VOLUME, "mountPath": "/var/lib/esper/kernels", "readOnly": True} in mounts
        if doc["kind"] == "TrainJob":
            assert {"name": "ESPER_KERNEL_DIR", "value": "/var/lib/esper/kernels"} in got["spec"]["trainer"][
                "env"
            ]


def test_the_server_refuses_a_sidecar_field_no_pod_template_has(kubectl: Kubectl) -> None:
    """The control: these CRDs do validate pod templates (an unknown container field is refused)."""
    (job,) = _training_docs("pytorchjob.yaml")
    job["metadata"]["name"] = "esper-grow-bad"
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["initContainers"][0]["sidecarMode"] = (
        True
    )
    proc = kubectl("apply", "--server-side", "--validate=strict", "-n", NS, "-f", "-",
                   stdin=yaml.safe_dump(job), check=False)  # fmt: skip
    assert proc.returncode != 0 and "sidecarMode" in proc.stderr
    assert kubectl("get", "pytorchjobs", "esper-grow-bad", "-n", NS, check=False).returncode != 0
