"""Baseline for benchmarks/operator.py: the least a kopf operator can do for the same observable result.

On each Blueprint it creates one Job, with no validation, no Kernel, no dedup and no status: what is
left of Esper's latency once kopf, the API server and the client are paid for.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
from kubernetes import client, config


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="noop.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="noop.dev")
    config.load_kube_config()
    memo.batch = client.BatchV1Api()


@kopf.on.create("esper.dev", "v1alpha1", "blueprints")
async def create_job(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"noop-{name}", "namespace": namespace},
        "spec": {
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}
            }
        },
    }
    await asyncio.to_thread(memo.batch.create_namespaced_job, namespace, job, _preload_content=False)
