"""The sidecar injector on Kubeflow's training jobs: every replica of a PyTorchJob, the trainer Job of a
Trainer v2 runtime, a TrainJob only beside its runtime; each injected pod template is a valid Pod."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from esper.sidecar.inject import SIDECAR, VOLUME, inject, inject_documents

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "ghcr.io/esper/esper:0.1.0"
KDIR = "/var/lib/esper/kernels"


def _pod(name: str) -> dict[str, Any]:
    return {
        "spec": {"containers": [{"name": name, "image": "trainer:1", "command": ["torchrun", "train.py"]}]}
    }


def _pytorchjob() -> dict[str, Any]:
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "grow"},
        "spec": {"pytorchReplicaSpecs": {
            "Master": {"replicas": 1, "template": _pod("pytorch")},
            "Worker": {"replicas": 3, "template": _pod("pytorch")},
        }},
    }  # fmt: skip


def _runtime(kind: str = "TrainingRuntime") -> dict[str, Any]:
    def job(name: str, step: str) -> dict[str, Any]:
        labels = {"trainer.kubeflow.org/trainjob-ancestor-step": step}
        return {"name": name, "template": {"metadata": {"labels": labels}, "spec": {"template": _pod(name)}}}

    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": kind,
        "metadata": {"name": "esper-torch"},
        "spec": {"template": {"spec": {"replicatedJobs": [
            job("dataset-initializer", "dataset-initializer"), job("node", "trainer"),
        ]}}},
    }  # fmt: skip


def _trainjob(runtime: str = "esper-torch") -> dict[str, Any]:
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": "grow"},
        "spec": {"runtimeRef": {"name": runtime}, "trainer": {"numNodes": 2}},
    }


def _assert_injected(pod_spec: dict[str, Any], app: str) -> None:
    init = pod_spec["initContainers"]
    assert [c["name"] for c in init] == [SIDECAR] and init[0]["restartPolicy"] == "Always"
    assert {"name": VOLUME, "emptyDir": {"sizeLimit": "8Gi"}} in pod_spec["volumes"]
    (c,) = [c for c in pod_spec["containers"] if c["name"] == app]
    assert {"name": VOLUME, "mountPath": KDIR, "readOnly": True} in c["volumeMounts"]
    assert {"name": "ESPER_KERNEL_DIR", "value": KDIR} in c["env"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod_spec}
    kubernetes_validate.validate(pod, "1.32.0", strict=True)  # a valid Pod, field by field


def test_every_replica_of_a_pytorchjob_gets_the_sidecar_and_injection_is_idempotent() -> None:
    job = _pytorchjob()
    before = copy.deepcopy(job)
    out = inject(job, image=IMAGE, selector="esper.dev/blueprint=mlp")
    assert job == before  # the input is not modified
    for replica in ("Master", "Worker"):
        _assert_injected(out["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"], "pytorch")
    assert out["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    assert inject(out, image=IMAGE, selector="esper.dev/blueprint=mlp") == out


@pytest.mark.parametrize("kind", ["TrainingRuntime", "ClusterTrainingRuntime"])
def test_a_trainer_runtime_gets_the_sidecar_in_its_trainer_job_only(kind: str) -> None:
    out = inject(_runtime(kind), image=IMAGE, kernels="k1")
    init, node = out["spec"]["template"]["spec"]["replicatedJobs"]
    _assert_injected(node["template"]["spec"]["template"]["spec"], "node")
    assert init == _runtime(kind)["spec"]["template"]["spec"]["replicatedJobs"][0]  # initializers untouched


def test_a_trainjob_is_injected_beside_its_runtime_and_refused_alone() -> None:
    text = yaml.safe_dump_all([_runtime(), _trainjob()], sort_keys=False)
    runtime, trainjob = yaml.safe_load_all(inject_documents(text, image=IMAGE, kernels="k1"))
    _assert_injected(runtime["spec"]["template"]["spec"]["replicatedJobs"][1]["template"]["spec"]["template"]["spec"],
                     "node")  # fmt: skip
    assert trainjob["spec"]["trainer"] == {
        "numNodes": 2,
        "env": [{"name": "ESPER_KERNEL_DIR", "value": KDIR}],
    }

    with pytest.raises(
        ValueError, match=r"TrainJob grow: a TrainJob cannot add the sidecar .* 'esper-torch'"
    ):
        inject_documents(yaml.safe_dump(_trainjob()), image=IMAGE, kernels="k1")
    other = yaml.safe_dump_all([_runtime(), _trainjob("another-runtime")])
    with pytest.raises(ValueError, match="'another-runtime'"):
        inject_documents(other, image=IMAGE, kernels="k1")


@pytest.mark.parametrize(
    ("doc", "msg"),
    [
        ({"kind": "PyTorchJob", "metadata": {"name": "j"}, "spec": {}}, "PyTorchJob j: no replicas at"),
        ({"kind": "PyTorchJob", "metadata": {"name": "j"}, "spec": {"pytorchReplicaSpecs": {"Worker": {}}}},
         "PyTorchJob j: no pod template spec at spec.pytorchReplicaSpecs.Worker.template.spec"),
        ({"kind": "TrainingRuntime", "metadata": {"name": "r"}, "spec": {"template": {"spec": {
            "replicatedJobs": [{"name": "model-initializer"}]}}}}, "TrainingRuntime r: no trainer Job"),
        ({"kind": "TrainJob", "metadata": {"name": "t"}, "spec": {}},
         "TrainJob t: no runtime at spec.runtimeRef"),
        ({"kind": "MPIJob", "metadata": {"name": "m"}},
         "cannot inject into kind 'MPIJob': expected one of .*PyTorchJob"),
    ],
)  # fmt: skip
def test_malformed_training_jobs_are_refused_with_the_path_at_fault(doc: dict[str, Any], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        inject(doc, image=IMAGE, kernels="k1")


def test_the_examples_inject_cleanly() -> None:
    for name, kinds in (
        ("pytorchjob.yaml", ["PyTorchJob"]),
        ("trainjob.yaml", ["TrainingRuntime", "TrainJob"]),
    ):
        text = inject_documents((ROOT / "examples" / name).read_text(), image=IMAGE, kernels="k1")
        docs = list(yaml.safe_load_all(text))
        assert [d["kind"] for d in docs if d["kind"] in kinds] == kinds
