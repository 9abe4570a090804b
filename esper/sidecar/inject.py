"""Add the Kasmina sync sidecar to a workload manifest, as a service-mesh injector would.

The sidecar is a native sidecar (an initContainer with `restartPolicy: Always`, Kubernetes >= 1.29):
it starts first, its startupProbe on /readyz holds the app containers back until the first sync is
done, it keeps running beside them, and it does not keep a Job's pod alive once the app exits.
The kernels land on an emptyDir shared with every app container (read-only there).

The pod's ServiceAccount needs the `esper-kernel-reader` ClusterRole (the chart provides it) bound in
the namespace, and a token: if the pod turns automounting off, a projected token is mounted into the
sidecar only.

Training jobs with several pod templates get the sidecar in each: every replica type of a
`PyTorchJob` (kubeflow.org/v1), and the trainer's replicated Job of a `TrainingRuntime` or
`ClusterTrainingRuntime` (trainer.kubeflow.org/v1alpha1). A `TrainJob` cannot add containers to its
pods (Trainer's runtime patches only patch containers the runtime already has), so its sidecar lives
in the runtime it references: a TrainJob is injected only together with that runtime, and gets the
kernel directory in `spec.trainer.env`.

Bundles are fetched with the S3 endpoint, region and a READ-ONLY credentials Secret given here (none
for workload identity: IRSA, GKE); the bucket's write key never enters a tenant namespace. The
public keys that bundle signatures must verify with come from a ConfigMap (the chart's
`esper-trusted-keys`), mounted into the sidecar and the app containers (whose `load_kernel` checks
them again). The shared volume has a size limit, and the sidecar refuses bundles above a maximum size.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from esper.sidecar.index import NAME_RE
from esper.targets import parse_targets

SIDECAR = "esper-kasmina"
VOLUME = "esper-kernels"
TOKEN_VOLUME = "esper-kasmina-token"
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
PORT = 9090
DEFAULT_KERNEL_DIR = "/var/lib/esper/kernels"
TRUSTED_KEYS_CONFIGMAP = "esper-trusted-keys"
TRUSTED_KEYS_VOLUME = "esper-trusted-keys"
TRUSTED_KEYS_DIR = "/etc/esper/trusted-keys"
DEFAULT_VOLUME_LIMIT = "8Gi"
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?([KMGTPE]i?)?")


@dataclass(frozen=True)
class StoreAccess:
    """How the sidecar reaches the store and what it trusts: S3 endpoint and region, a read-only
    credentials Secret (None: workload identity), the trusted public keys' ConfigMap, limits."""

    s3_endpoint: str | None = None
    s3_region: str | None = None
    credentials_secret: str | None = None
    trusted_keys_configmap: str | None = TRUSTED_KEYS_CONFIGMAP
    volume_size_limit: str = DEFAULT_VOLUME_LIMIT
    max_bundle_bytes: int | None = None

    def check(self) -> None:
        if self.credentials_secret is not None and not NAME_RE.fullmatch(self.credentials_secret):
            raise ValueError(
                f"credentials secret {self.credentials_secret!r} is not a Kubernetes object name"
            )
        if self.trusted_keys_configmap is not None and not NAME_RE.fullmatch(self.trusted_keys_configmap):
            raise ValueError(
                f"trusted keys ConfigMap {self.trusted_keys_configmap!r} is not a Kubernetes object name"
            )
        if not _QUANTITY.fullmatch(self.volume_size_limit):
            raise ValueError(f"volume size limit {self.volume_size_limit!r} is not a quantity such as 8Gi")


# Where the pod template sits in each workload kind.
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
#: Training jobs: several pod templates (PyTorchJob) or a runtime's template (Kubeflow Trainer v2).
RUNTIME_KINDS = ("TrainingRuntime", "ClusterTrainingRuntime")
TRAINING_KINDS = ("PyTorchJob", *RUNTIME_KINDS, "TrainJob")
KINDS = (*TEMPLATE_PATHS, *TRAINING_KINDS)
TRAINER_STEP_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": PORT}, "periodSeconds": period, "failureThreshold": failures}


def sidecar_container(
    *,
    image: str,
    kernels: Sequence[str] = (),
    selector: str | None = None,
    store_uri: str | None = None,
    kernel_dir: str = DEFAULT_KERNEL_DIR,
    token_volume: bool = False,
    access: StoreAccess = StoreAccess(),
    targets: Sequence[str] = (),
) -> dict[str, Any]:
    """The esper-kasmina native sidecar container; with `targets`, it syncs only their Kernels."""
    env: list[dict[str, Any]] = [{"name": "ESPER_KERNEL_DIR", "value": kernel_dir}]
    if kernels:
        env.append({"name": "ESPER_KERNELS", "value": ",".join(kernels)})
    if selector:
        env.append({"name": "ESPER_KERNEL_SELECTOR", "value": selector})
    if targets:
        env.append({"name": "ESPER_TARGET", "value": ",".join(targets)})
    env.append({"name": "ESPER_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}})
    if store_uri:
        env.append({"name": "ESPER_STORE_URI", "value": store_uri})
    env.append({"name": "ESPER_SYNC_PORT", "value": str(PORT)})
    env.append({"name": "PYTHONDONTWRITEBYTECODE", "value": "1"})
    if access.s3_endpoint:
        env.append({"name": "ESPER_S3_ENDPOINT", "value": access.s3_endpoint})
    if access.s3_region:
        env.append({"name": "AWS_REGION", "value": access.s3_region})
    if access.credentials_secret:
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = {"name": access.credentials_secret, "key": var}
            env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    if access.max_bundle_bytes:
        env.append({"name": "ESPER_MAX_BUNDLE_BYTES", "value": str(access.max_bundle_bytes)})
    mounts: list[dict[str, Any]] = [{"name": VOLUME, "mountPath": kernel_dir}]
    if access.trusted_keys_configmap:
        env.append({"name": "ESPER_TRUSTED_KEYS", "value": TRUSTED_KEYS_DIR})
        mounts.append({"name": TRUSTED_KEYS_VOLUME, "mountPath": TRUSTED_KEYS_DIR, "readOnly": True})
    if token_volume:
        mounts.append({"name": TOKEN_VOLUME, "mountPath": TOKEN_PATH, "readOnly": True})
    return {
        "name": SIDECAR,
        "image": image,
        "restartPolicy": "Always",
        "command": ["esper", "kasmina", "sync"],
        "env": env,
        "ports": [{"name": "esper-sync", "containerPort": PORT, "protocol": "TCP"}],
        # Startup gates the app containers on the first sync (up to 10 minutes of downloads).
        "startupProbe": _probe("/readyz", 1, 600),
        "readinessProbe": _probe("/readyz", 10, 3),
        "livenessProbe": _probe("/healthz", 20, 3),
        "resources": {"requests": {"cpu": "20m", "memory": "96Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _token_volume() -> dict[str, Any]:
    """What the kubelet mounts when automounting is on: a bound token, the CA, the namespace."""
    return {"name": TOKEN_VOLUME, "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace",
                                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
    ]}}  # fmt: skip


def _get(node: Any, *path: str) -> Any:
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _template_spec(template: Any, where: str, path: str) -> dict[str, Any]:
    spec = _get(template, "spec")
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: no pod template spec at {path}")
    if not spec.get("containers"):
        raise ValueError(f"{where}: the pod template at {path} has no containers")
    return spec


def _is_trainer(job: dict[str, Any]) -> bool:
    """The trainer's replicated Job of a Trainer runtime (not the dataset or model initializers)."""
    step = _get(job, "template", "metadata", "labels", TRAINER_STEP_LABEL)
    return step == "trainer" or (step is None and job.get("name") == "node")


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod template spec of a workload the sidecar goes into (a TrainJob has none)."""
    kind = doc.get("kind")
    where = f"{kind} {(doc.get('metadata') or {}).get('name', '?')}"
    if kind == "PyTorchJob":
        replicas = _get(doc, "spec", "pytorchReplicaSpecs")
        if not isinstance(replicas, dict) or not replicas:
            raise ValueError(f"{where}: no replicas at spec.pytorchReplicaSpecs")
        return [
            _template_spec(_get(r, "template"), where, f"spec.pytorchReplicaSpecs.{name}.template.spec")
            for name, r in replicas.items()
        ]
    if kind in RUNTIME_KINDS:
        jobs = _get(doc, "spec", "template", "spec", "replicatedJobs")
        if not isinstance(jobs, list) or not jobs:
            raise ValueError(f"{where}: no replicated Jobs at spec.template.spec.replicatedJobs")
        trainers = [j for j in jobs if isinstance(j, dict) and _is_trainer(j)]
        if not trainers:
            raise ValueError(
                f"{where}: no trainer Job (a replicated Job labelled {TRAINER_STEP_LABEL}: trainer, "
                "or named node)"
            )
        return [
            _template_spec(_get(j, "template", "spec", "template"), where,
                           f"spec.template.spec.replicatedJobs[{j.get('name')}].template.spec.template.spec")
            for j in trainers
        ]  # fmt: skip
    if kind == "TrainJob":
        return []
    return [_pod_spec(doc)]


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    kind = doc.get("kind")
    if kind not in TEMPLATE_PATHS:
        raise ValueError(f"cannot inject into kind {kind!r}: expected one of {', '.join(KINDS)}")
    node: Any = doc
    for part in TEMPLATE_PATHS[kind]:
        node = node.get(part) if isinstance(node, dict) else None
    spec = node.get("spec") if isinstance(node, dict) else None
    name = (doc.get("metadata") or {}).get("name", "?")
    if not isinstance(spec, dict):
        path = ".".join((*TEMPLATE_PATHS[kind], "spec"))
        raise ValueError(f"{kind} {name}: no pod template spec at {path}")
    if not spec.get("containers"):
        raise ValueError(f"{kind} {name}: the pod template has no containers")
    return spec


def _upsert(items: list[dict[str, Any]], item: dict[str, Any], at: int | None = None) -> None:
    """Replace the item of the same name, else insert it (idempotent re-injection)."""
    for i, existing in enumerate(items):
        if existing.get("name") == item["name"]:
            items[i] = item
            return
    items.insert(len(items) if at is None else at, item)


def inject(
    manifest: dict[str, Any],
    *,
    image: str,
    kernels: Sequence[str] | str | None = None,
    selector: str | None = None,
    store_uri: str | None = None,
    kernel_dir: str = DEFAULT_KERNEL_DIR,
    service_account: str | None = None,
    runtimes: Collection[str] = (),
    s3_endpoint: str | None = None,
    s3_region: str | None = None,
    credentials_secret: str | None = None,
    trusted_keys_configmap: str | None = TRUSTED_KEYS_CONFIGMAP,
    volume_size_limit: str = DEFAULT_VOLUME_LIMIT,
    max_bundle_bytes: int | None = None,
    targets: Sequence[str] | str = (),
) -> dict[str, Any]:
    """A copy of `manifest` (one workload) with the sidecar, the volume and the mounts in each of its
    pod templates; idempotent. `targets` (cpu, cpu-avx512, cuda-sm90, ...; a list or comma-separated):
    the sidecar syncs only those targets' Kernels (empty: every target's).

    `runtimes`: names of the (Cluster)TrainingRuntimes injected alongside (a TrainJob must reference
    one of them). ValueError: unknown kind, no containers, nothing to sync, a bad name, a conflicting
    volume, mount path or ServiceAccount, or a TrainJob whose runtime is not injected with it.

    S3: `s3_endpoint`, `s3_region` and `credentials_secret` (a read-only key; None for workload
    identity). `trusted_keys_configmap`: the public keys bundles must be signed with (None: the image's
    own configuration). The kernel volume is an emptyDir of at most `volume_size_limit`.
    """
    access = StoreAccess(
        s3_endpoint,
        s3_region,
        credentials_secret,
        trusted_keys_configmap,
        volume_size_limit,
        max_bundle_bytes,
    )
    access.check()
    names = [n.strip() for n in kernels.split(",")] if isinstance(kernels, str) else list(kernels or ())
    names = [n for n in names if n]
    if not names and not selector:
        raise ValueError("nothing to sync: give kernels (Kernel names) and/or a label selector")
    if bad := [n for n in names if not NAME_RE.fullmatch(n)]:
        raise ValueError(f"not Kubernetes object names: {', '.join(map(repr, bad))}")
    if not image:
        raise ValueError("the sidecar image is required")
    wanted = parse_targets(targets)  # ValueError: what is accepted
    if not kernel_dir.startswith("/"):
        raise ValueError(f"kernel_dir {kernel_dir!r} must be an absolute path")
    if not isinstance(manifest, dict):
        raise ValueError("expected one manifest (a mapping); split multi-document YAML with inject_documents")
    doc = copy.deepcopy(manifest)
    where = f"{doc.get('kind')} {(doc.get('metadata') or {}).get('name', '?')}"
    if doc.get("kind") == "TrainJob":
        _inject_trainjob(doc, where, kernel_dir, runtimes)
    for spec in _pod_specs(doc):
        _inject_spec(
            spec, where, image, names, selector, store_uri, kernel_dir, service_account, access, wanted
        )
    return doc


def _inject_trainjob(doc: dict[str, Any], where: str, kernel_dir: str, runtimes: Collection[str]) -> None:
    ref = _get(doc, "spec", "runtimeRef", "name")
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"{where}: no runtime at spec.runtimeRef.name")
    if ref not in runtimes:
        raise ValueError(
            f"{where}: a TrainJob cannot add the sidecar to its pods (its runtime patches only patch "
            f"containers the runtime has); inject its runtime {ref!r} together with it (one input: "
            "the TrainingRuntime or ClusterTrainingRuntime documents beside the TrainJob)"
        )
    spec = doc.setdefault("spec", {})
    trainer = spec.get("trainer")
    if trainer is None:
        trainer = spec["trainer"] = {}
    if not isinstance(trainer, dict):
        raise ValueError(f"{where}: spec.trainer is not a mapping")
    _upsert(trainer.setdefault("env", []), {"name": "ESPER_KERNEL_DIR", "value": kernel_dir})


def _inject_spec(
    spec: dict[str, Any],
    where: str,
    image: str,
    names: list[str],
    selector: str | None,
    store_uri: str | None,
    kernel_dir: str,
    service_account: str | None,
    access: StoreAccess,
    targets: Sequence[str],
) -> None:
    """The sidecar, the shared volume, the mounts and the env in one pod template spec (in place)."""
    volumes = spec.setdefault("volumes", [])
    existing = next((v for v in volumes if v.get("name") == VOLUME), None)
    if existing is not None and "emptyDir" not in existing:
        raise ValueError(f"{where}: a volume named {VOLUME!r} already exists and is not an emptyDir")
    if existing is None:
        volumes.append({"name": VOLUME, "emptyDir": {"sizeLimit": access.volume_size_limit}})
    elif not existing["emptyDir"] or not existing["emptyDir"].get("sizeLimit"):
        existing["emptyDir"] = {**(existing["emptyDir"] or {}), "sizeLimit": access.volume_size_limit}
    if access.trusted_keys_configmap:
        cm = {"name": TRUSTED_KEYS_VOLUME, "configMap": {"name": access.trusted_keys_configmap}}
        _upsert(volumes, cm)

    if service_account:
        current = spec.get("serviceAccountName") or spec.get("serviceAccount")
        if current and current != service_account:
            raise ValueError(f"{where}: serviceAccountName is {current!r}, not {service_account!r}")
        spec["serviceAccountName"] = service_account
    token = spec.get("automountServiceAccountToken") is False
    if token:
        _upsert(volumes, _token_volume())

    for c in spec["containers"]:
        for m in c.get("volumeMounts", []):
            if m.get("mountPath") == kernel_dir and m.get("name") != VOLUME:
                raise ValueError(
                    f"{where}: container {c.get('name')!r} already mounts {m['name']!r} at {kernel_dir}"
                )
        _upsert(c.setdefault("volumeMounts", []), {"name": VOLUME, "mountPath": kernel_dir, "readOnly": True})
        _upsert(c.setdefault("env", []), {"name": "ESPER_KERNEL_DIR", "value": kernel_dir})
        if access.trusted_keys_configmap:  # the trainer's load_kernel verifies the signature again
            mount = {"name": TRUSTED_KEYS_VOLUME, "mountPath": TRUSTED_KEYS_DIR, "readOnly": True}
            _upsert(c["volumeMounts"], mount)
            _upsert(c["env"], {"name": "ESPER_TRUSTED_KEYS", "value": TRUSTED_KEYS_DIR})

    sidecar = sidecar_container(
        image=image,
        kernels=names,
        selector=selector,
        store_uri=store_uri,
        kernel_dir=kernel_dir,
        token_volume=token,
        access=access,
        targets=targets,
    )
    _upsert(spec.setdefault("initContainers", []), sidecar, at=0)  # first: later init containers see kernels


_SEPARATOR = re.compile(r"^---[ \t]*(?:#.*)?$", re.MULTILINE)


def inject_documents(text: str, **kwargs: Any) -> str:
    """`inject` every workload in multi-document YAML; other documents pass through byte for byte.

    A `kind: List` (kubectl's output) has each workload item injected. Keyword arguments go to `inject`.
    """
    chunks = _SEPARATOR.split(text)
    docs = [yaml.safe_load(chunk) if chunk.strip() else None for chunk in chunks]
    items = [i for d in docs if isinstance(d, dict) for i in (d, *_list_items(d)) if isinstance(i, dict)]
    runtimes = {
        str(_get(i, "metadata", "name"))
        for i in items
        if isinstance(i, dict) and i.get("kind") in RUNTIME_KINDS
    }
    kwargs.setdefault("runtimes", runtimes)
    out = []
    for chunk, doc in zip(chunks, docs, strict=True):
        if isinstance(doc, dict) and doc.get("kind") in KINDS:
            out.append("\n" + yaml.safe_dump(inject(doc, **kwargs), sort_keys=False))
        elif isinstance(doc, dict) and _list_items(doc):
            doc["items"] = [
                inject(i, **kwargs) if isinstance(i, dict) and i.get("kind") in KINDS else i
                for i in doc["items"]
            ]
            out.append("\n" + yaml.safe_dump(doc, sort_keys=False))
        else:
            out.append(chunk)
    return "---".join(out).lstrip("\n")


def _list_items(doc: dict[str, Any]) -> list[Any]:
    items = doc.get("items")
    return items if doc.get("kind") == "List" and isinstance(items, list) else []
