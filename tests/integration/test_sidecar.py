"""The Kasmina sync sidecar against the emulated Kubernetes API and a moto S3 server.

Kernels are created through the API and made Ready through the status subresource with a small fake
bundle uploaded to S3, as the operator would. Every wait polls (`wait_for`); nothing sleeps.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from esper import signing
from esper.artifact import FORWARD, verify_bundle
from esper.contracts.common import ArtifactRef
from esper.sidecar.config import default_namespace, parse_selector, selector_matches
from esper.sidecar.index import IndexEntry, read_index
from esper.sidecar.server import SyncServer
from esper.sidecar.sync import ConfigError, KernelSync, SyncConfig, desired_of, store_uri_of
from esper.storage import StorageError, Store, open_store, parse_s3_uri
from esper.storage.s3 import S3Store
from tests.support.cluster import Cluster, running_cluster, wait_for
from tests.support.s3 import make_fake_bundle

REPO = Path(__file__).resolve().parents[2]
# Kernels on the real API server (hybrid) where one is found, as the sidecar will list and watch them.
pytestmark = pytest.mark.prefer_real


# ---- helpers ---------------------------------------------------------------------------------------


def kernel(name: str, key: str, labels: dict[str, str] | None = None, target: str = "cpu") -> dict[str, Any]:
    return {
        "apiVersion": "esper.dev/v1alpha1", "kind": "Kernel",
        "metadata": {"name": name, "namespace": "default", "labels": labels or {}},
        "spec": {"blueprint": "mlp", "target": target, "key": key, "irDigest": key,
                 "graph": {"inputs": [{"name": "x", "shape": ["batch", 4]}],
                           "nodes": [{"id": "out", "op": "relu", "inputs": ["x"]}], "outputs": ["out"]},
                 "toolchain": {"torch": "2.13.0", "capability": "cpu-avx2"}},
    }  # fmt: skip


def upload(store_uri: str, workdir: Path, seed: int) -> tuple[str, ArtifactRef]:
    key, _ = make_fake_bundle(workdir / f"bundle-{seed}", seed=seed)
    return key, open_store(store_uri).put_bundle(key, workdir / f"bundle-{seed}")


def make_ready(c: Cluster, name: str, ref: ArtifactRef) -> None:
    c.patch("kernels", name, {"status": {"phase": "Ready", "artifact": ref.model_dump()}}, status=True)


def add_ready_kernel(
    c: Cluster, store_uri: str, workdir: Path, name: str, seed: int, labels: dict[str, str] | None = None
) -> tuple[str, ArtifactRef]:
    key, ref = upload(store_uri, workdir, seed)
    c.create(kernel(name, key, labels))
    make_ready(c, name, ref)
    return key, ref


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as rsp:
            return rsp.status
    except urllib.error.HTTPError as e:
        return e.code


def metric(sync: KernelSync, name: str, **labels: str) -> float:
    return sync.metrics.registry.get_sample_value(name, labels) or 0.0


def installed(vol: Path, name: str, sha: str) -> bool:
    """The bundle is whole and verified on disk, and the index lists it with that sha256."""
    entry = read_index(vol).get(name)
    if entry is None or entry.sha256 != sha:
        return False
    verify_bundle(entry.bundle_dir(vol), sha, expected_key=entry.key)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SwitchStore:
    """Delegates to `current`; tests swap it (a dead endpoint, then the real one) or gate fetches."""

    def __init__(self, current: Store) -> None:
        self.current = current
        self.gate = threading.Event()
        self.gate.set()
        self.calls = 0

    def fetch_bundle(self, key: str, dest_dir: Path, expected_sha256: str | None = None, **kw: Any) -> Path:
        self.calls += 1
        self.gate.wait(30)
        return self.current.fetch_bundle(key, dest_dir, expected_sha256, **kw)


Factory = Callable[..., tuple[KernelSync, int]]


@pytest.fixture
def sidecar(cluster: Cluster, tmp_path: Path) -> Iterator[Factory]:
    """A factory: `sidecar(kernels=(...), store=...)` -> (a started KernelSync, its HTTP port)."""
    started: list[tuple[KernelSync, SyncServer]] = []

    def make(
        store: Any = None, api_client: Any = None, start: bool = True, **overrides: Any
    ) -> tuple[KernelSync, int]:
        cfg = {
            "kernel_dir": tmp_path / "vol",
            "namespace": "default",
            "port": 0,
            "host": "127.0.0.1",
            "watch_timeout": 5,
            "retry_base": 0.05,
            "retry_max": 0.4,
            **overrides,
        }
        sync = KernelSync(
            SyncConfig(**cfg),
            api_client=api_client or cluster.api_client(),
            store_factory=(lambda uri: store) if store is not None else open_store,
        )
        server = SyncServer(sync.metrics.registry, sync.ready, port=0, host="127.0.0.1").start()
        started.append((sync, server))
        if start:
            sync.start()
        return sync, server.port

    yield make
    for sync, server in started:
        sync.stop()
        server.stop()


# ---- scenarios against the emulated cluster ------------------------------------------------------


@pytest.mark.cluster
def test_installs_ready_kernels_and_flips_readiness(
    cluster: Cluster, sidecar: Factory, s3_bucket: str, tmp_path: Path
) -> None:
    _, ref_a = add_ready_kernel(cluster, s3_bucket, tmp_path, "kernel-a", 1)
    key_b, ref_b = upload(s3_bucket, tmp_path, 2)
    cluster.create(kernel("kernel-b", key_b))  # Pending: not waited for, installed once Ready
    cluster.create(kernel("other", key_b))  # not asked for
    gate = SwitchStore(open_store(s3_bucket))
    gate.gate.clear()  # hold the first download so "not ready yet" is observable
    sync, port = sidecar(store=gate, kernels=("kernel-a", "kernel-b"))
    vol = tmp_path / "vol"

    wait_for(lambda: gate.calls == 1)
    assert http_status(port, "/readyz") == 503
    assert http_status(port, "/healthz") == 200
    assert read_index(vol).get("kernel-a") is None
    gate.gate.set()

    wait_for(lambda: http_status(port, "/readyz") == 200)
    assert installed(vol, "kernel-a", ref_a.sha256)
    entry = read_index(vol).get("kernel-a")
    assert entry == IndexEntry(
        name="kernel-a",
        namespace="default",
        key=entry.key,
        sha256=ref_a.sha256,
        target="cpu",
        blueprint="mlp",
        path="kernels/kernel-a",
        size=ref_a.size,
    )
    assert not (vol / "kernels" / "other").exists()

    version = read_index(vol).version
    make_ready(cluster, "kernel-b", ref_b)  # the watch wakes the reconciler
    wait_for(lambda: installed(vol, "kernel-b", ref_b.sha256))
    assert read_index(vol).version > version
    assert sorted(p.name for p in (vol / "kernels").iterdir()) == ["kernel-a", "kernel-b"]  # no temp dirs
    assert metric(sync, "esper_sync_kernels_installed") == 2
    assert metric(sync, "esper_sync_downloads_total", outcome="success") == 2
    assert metric(sync, "esper_sync_last_success_timestamp") > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
        assert b"esper_sync_download_seconds_count 2.0" in rsp.read()


@pytest.mark.cluster
def test_s3_outage_is_retried_with_backoff_and_recovers(
    cluster: Cluster, sidecar: Factory, s3_bucket: str, tmp_path: Path
) -> None:
    _, ref = add_ready_kernel(cluster, s3_bucket, tmp_path, "kernel-a", 1)
    bucket, prefix = parse_s3_uri(s3_bucket)
    dead = S3Store(
        bucket,
        prefix,
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        max_attempts=1,
        connect_timeout=1,
        read_timeout=1,
    )
    store = SwitchStore(dead)
    sync, port = sidecar(store=store, kernels=("kernel-a",))

    wait_for(lambda: metric(sync, "esper_sync_downloads_total", outcome="storage_error") >= 3)
    assert "cannot reach" in sync.failures()["kernel-a"]
    assert metric(sync, "esper_sync_errors_total", kind="storage") >= 3
    assert http_status(port, "/readyz") == 503  # a transient failure is not "done"
    assert not (tmp_path / "vol" / "kernels" / "kernel-a").exists()

    store.current = open_store(s3_bucket)  # S3 is back
    wait_for(lambda: installed(tmp_path / "vol", "kernel-a", ref.sha256))
    wait_for(lambda: http_status(port, "/readyz") == 200)
    assert sync.failures() == {}


class PerKeyStore(SwitchStore):
    """Holds the fetches of `blocked` until `release` is set; fails those of `flaky` `failures` times."""

    def __init__(self, current: Store, blocked: str, flaky: str, failures: int) -> None:
        super().__init__(current)
        self.blocked, self.flaky, self.failures = blocked, flaky, failures
        self.release = threading.Event()

    def fetch_bundle(self, key: str, dest_dir: Path, expected_sha256: str | None = None, **kw: Any) -> Path:
        if key == self.blocked:
            self.release.wait(30)
        elif key == self.flaky and self.failures > 0:
            self.failures -= 1
            raise StorageError("s3 is down (injected)")
        return super().fetch_bundle(key, dest_dir, expected_sha256, **kw)


@pytest.mark.cluster
def test_one_slow_or_failing_kernel_does_not_block_the_others(
    cluster: Cluster, sidecar: Factory, s3_bucket: str, tmp_path: Path
) -> None:
    _, ref_a = add_ready_kernel(cluster, s3_bucket, tmp_path, "kernel-a", 1)
    key_b, ref_b = add_ready_kernel(cluster, s3_bucket, tmp_path, "kernel-b", 2)
    key_c, ref_c = add_ready_kernel(cluster, s3_bucket, tmp_path, "kernel-c", 3)
    store = PerKeyStore(open_store(s3_bucket), blocked=key_b, flaky=key_c, failures=3)
    sync, port = sidecar(store=store, kernels=("kernel-a", "kernel-b", "kernel-c"), workers=2)
    vol = tmp_path / "vol"

    # kernel-b hangs in a worker; kernel-c fails three times and is retried; kernel-a is unaffected.
    wait_for(lambda: installed(vol, "kernel-a", ref_a.sha256) and installed(vol, "kernel-c", ref_c.sha256))
    assert metric(sync, "esper_sync_downloads_total", outcome="storage_error") == 3
    assert read_index(vol).get("kernel-b") is None
    assert http_status(port, "/readyz") == 503  # kernel-b is still on its way
    store.release.set()
    wait_for(lambda: installed(vol, "kernel-b", ref_b.sha256))
    wait_for(lambda: http_status(port, "/readyz") == 200)


@pytest.mark.cluster
def test_deleted_unready_or_unmatched_kernels_are_removed(
    cluster: Cluster, sidecar: Factory, s3_bucket: str, tmp_path: Path
) -> None:
    labels = {"esper.dev/blueprint": "mlp"}
    _, ref_a = add_ready_kernel(cluster, s3_bucket, tmp_path, "kernel-a", 1, labels)
    _, ref_b = add_ready_kernel(cluster, s3_bucket, tmp_path, "kernel-b", 2, labels)
    _, ref_c = add_ready_kernel(cluster, s3_bucket, tmp_path, "kernel-c", 3, labels)
    add_ready_kernel(cluster, s3_bucket, tmp_path, "unlabelled", 4)
    sync, port = sidecar(selector="esper.dev/blueprint=mlp")
    vol = tmp_path / "vol"
    wait_for(
        lambda: all(
            installed(vol, n, r.sha256)
            for n, r in (("kernel-a", ref_a), ("kernel-b", ref_b), ("kernel-c", ref_c))
        )
    )
    assert read_index(vol).get("unlabelled") is None
    assert http_status(port, "/readyz") == 200

    cluster.delete("kernels", "kernel-a")
    wait_for(lambda: read_index(vol).get("kernel-a") is None and not (vol / "kernels" / "kernel-a").exists())
    cluster.patch("kernels", "kernel-b", {"metadata": {"labels": {"esper.dev/blueprint": "other"}}})
    wait_for(lambda: read_index(vol).get("kernel-b") is None and not (vol / "kernels" / "kernel-b").exists())
    cluster.patch("kernels", "kernel-c", {"status": {"phase": "Failed", "artifact": None}}, status=True)
    wait_for(lambda: read_index(vol).kernels == [] and not (vol / "kernels" / "kernel-c").exists())
    assert metric(sync, "esper_sync_kernels_installed") == 0
    assert http_status(port, "/readyz") == 200  # readiness is latched after the first sync


@pytest.mark.cluster
def test_tampered_bundle_is_refused_then_repaired(
    cluster: Cluster, sidecar: Factory, s3_bucket: str, tmp_path: Path
) -> None:
    key, ref = upload(s3_bucket, tmp_path, 1)
    bucket, prefix = parse_s3_uri(s3_bucket)
    s3 = boto3.client("s3", endpoint_url=os.environ["ESPER_S3_ENDPOINT"], region_name="us-east-1")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/kernels/{key}/{FORWARD}", Body=b"tampered")
    cluster.create(kernel("kernel-a", key))
    make_ready(cluster, "kernel-a", ref)
    sync, port = sidecar(kernels=("kernel-a",))  # the real S3 store, derived from status.artifact.uri

    wait_for(lambda: metric(sync, "esper_sync_downloads_total", outcome="artifact_error") >= 2)
    assert metric(sync, "esper_sync_errors_total", kind="artifact") >= 2
    assert FORWARD in sync.failures()["kernel-a"]
    vol = tmp_path / "vol"
    assert read_index(vol).get("kernel-a") is None and not (vol / "kernels" / "kernel-a").exists()
    assert [p.name for p in (vol / "kernels").iterdir()] == []  # no partial download left behind
    assert http_status(port, "/readyz") == 200  # bad content is settled: the pod may start without it

    open_store(s3_bucket).put_bundle(key, tmp_path / "bundle-1", replace=True)  # repaired
    wait_for(lambda: installed(vol, "kernel-a", ref.sha256))


@pytest.mark.cluster
@pytest.mark.parametrize("signer", ["none", "foreign"])
def test_bundle_esper_did_not_sign_is_never_installed(
    cluster: Cluster, sidecar: Factory, s3_bucket: str, tmp_path: Path, signer: str
) -> None:
    """Whoever can write the bucket (and even the Kernel's status sha256) cannot get a bundle onto
    the training pod's volume: its signature must hold for a trusted key."""
    signing.ensure_local_keys()  # the sidecar's trusted key (the local one here) exists
    d = tmp_path / "planted"
    key, _ = make_fake_bundle(d, seed=7, signed=False)
    if signer == "foreign":
        signing.sign_bundle(d, Ed25519PrivateKey.generate())
    ref = open_store(s3_bucket).put_bundle(key, d)
    cluster.create(kernel("kernel-a", key))
    make_ready(cluster, "kernel-a", ref)  # the sha256 matches: only the signature can refuse it
    sync, _ = sidecar(kernels=("kernel-a",))
    wait_for(lambda: metric(sync, "esper_sync_downloads_total", outcome="artifact_error") >= 1)
    reason = "unsigned" if signer == "none" else "not trusted"
    assert reason in sync.failures()["kernel-a"]
    vol = tmp_path / "vol"
    installed_dirs = [p for p in (vol / "kernels").iterdir() if not p.name.startswith(".")]  # retries' temps
    assert read_index(vol).get("kernel-a") is None and installed_dirs == []


@pytest.mark.cluster
def test_bundle_larger_than_the_limit_is_refused_before_download(
    cluster: Cluster, sidecar: Factory, s3_bucket: str, tmp_path: Path
) -> None:
    _, ref = add_ready_kernel(cluster, s3_bucket, tmp_path, "kernel-a", 1)  # 3 x 4096 B + manifest
    sync, _ = sidecar(kernels=("kernel-a",), max_bundle_bytes=4096)
    wait_for(lambda: "kernel-a" in sync.failures())
    assert f"bundle is {ref.size} bytes, more than the 4096 allowed" in sync.failures()["kernel-a"]
    assert read_index(tmp_path / "vol").get("kernel-a") is None


@pytest.mark.cluster
def test_watch_reconnects_and_a_restart_reuses_the_volume(
    cluster: Cluster, sidecar: Factory, s3_bucket: str, tmp_path: Path
) -> None:
    _, ref_a = add_ready_kernel(cluster, s3_bucket, tmp_path, "kernel-a", 1)
    sync, _ = sidecar(kernels=("kernel-a", "kernel-b"))
    vol = tmp_path / "vol"
    wait_for(lambda: installed(vol, "kernel-a", ref_a.sha256))
    cluster.call(lambda e: e.close_watches())  # the API server drops every watch
    _, ref_b = add_ready_kernel(cluster, s3_bucket, tmp_path, "kernel-b", 2)
    wait_for(lambda: installed(vol, "kernel-b", ref_b.sha256))
    sync.stop()
    version = read_index(vol).version

    again, port = sidecar(kernels=("kernel-a", "kernel-b"))  # same emptyDir: nothing to download
    wait_for(lambda: http_status(port, "/readyz") == 200)
    assert metric(again, "esper_sync_downloads_total", outcome="success") == 0
    assert installed(vol, "kernel-a", ref_a.sha256) and installed(vol, "kernel-b", ref_b.sha256)
    assert read_index(vol).version >= version


@pytest.mark.cluster
def test_api_unreachable_keeps_serving_what_is_installed(s3_bucket: str, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    config = SyncConfig(
        kernel_dir=vol, kernels=("kernel-a",), port=0, watch_timeout=5, retry_base=0.05, retry_max=0.2
    )
    with running_cluster(tmp_path / "cluster") as c:
        _, ref = add_ready_kernel(c, s3_bucket, tmp_path, "kernel-a", 1)
        sync = KernelSync(config, api_client=c.api_client()).start()
        wait_for(lambda: installed(vol, "kernel-a", ref.sha256) and sync.ready())
    try:  # the API server is gone now
        wait_for(lambda: metric(sync, "esper_sync_errors_total", kind="kube_api") >= 2)
        assert installed(vol, "kernel-a", ref.sha256) and sync.ready()
    finally:
        sync.stop()


@pytest.mark.cluster
def test_run_sync_entry_point_in_a_process(cluster: Cluster, s3_bucket: str, tmp_path: Path) -> None:
    _, ref = add_ready_kernel(cluster, s3_bucket, tmp_path, "kernel-a", 1)
    port = free_port()
    env = {
        **os.environ,
        **cluster.env(),
        "ESPER_KERNEL_DIR": str(tmp_path / "vol"),
        "ESPER_KERNELS": "kernel-a",
        "ESPER_SYNC_PORT": str(port),
        "ESPER_SYNC_HOST": "127.0.0.1",
        "POD_NAMESPACE": "default",
    }
    code = "import sys; from esper.sidecar.sync import run_sync; sys.exit(run_sync())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: proc.poll() is None and http_status(port, "/readyz") == 200, timeout=60)
        assert installed(tmp_path / "vol", "kernel-a", ref.sha256)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        out = proc.communicate()[0]
    assert "installed kernel-a" in out, out


@pytest.mark.cluster
def test_injected_sidecar_with_static_credentials_gets_a_kernel_in_a_tenant_namespace(
    cluster: Cluster, s3_server: str, s3_bucket: str, tmp_path: Path
) -> None:
    """MinIO-style static credentials: `inject` gives the sidecar the endpoint, the region and a
    read-only Secret in the tenant's namespace, which is not the operator's; with only what the
    injected container spec says (no AWS variables of its own) the sidecar installs the Kernel."""
    from esper.sidecar.inject import inject

    ns = "team-a"
    cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    creds = {"AWS_ACCESS_KEY_ID": "readonly", "AWS_SECRET_ACCESS_KEY": "readonly-secret"}
    cluster.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "esper-s3-readonly", "namespace": ns},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in creds.items()},
        }
    )
    key, ref = upload(s3_bucket, tmp_path, 3)
    obj = kernel("kernel-a", key)
    obj["metadata"]["namespace"] = ns
    cluster.create(obj)
    ready = {"status": {"phase": "Ready", "artifact": ref.model_dump()}}
    cluster.patch("kernels", "kernel-a", ready, namespace=ns, status=True)

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "trainer", "namespace": ns},
           "spec": {"containers": [{"name": "train", "image": "trainer"}]}}  # fmt: skip
    injected = inject(
        pod,
        image="esper",
        kernels=["kernel-a"],
        s3_endpoint=s3_server,
        s3_region="us-east-1",
        credentials_secret="esper-s3-readonly",
    )
    sidecar = injected["spec"]["initContainers"][0]
    keys_dir = tmp_path / "trusted-keys"  # the esper-trusted-keys ConfigMap, as mounted
    keys_dir.mkdir()
    (keys_dir / "key-0.pub").write_bytes(signing.ensure_local_keys()[1].read_bytes())
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    host = {"esper-kernels": str(tmp_path / "vol"), "esper-trusted-keys": str(keys_dir)}
    env: dict[str, str] = {}
    for var in sidecar["env"]:
        if "value" in var:
            value = var["value"]
            env[var["name"]] = host[mounts[value]] if value in mounts else value
        elif "secretKeyRef" in var["valueFrom"]:
            ref_ = var["valueFrom"]["secretKeyRef"]
            secret = cluster.get("secrets", ref_["name"], namespace=ns)
            env[var["name"]] = base64.b64decode(secret["data"][ref_["key"]]).decode()
        else:
            env[var["name"]] = ns  # fieldRef metadata.namespace
    port = free_port()
    env.update(ESPER_SYNC_PORT=str(port), ESPER_SYNC_HOST="127.0.0.1")
    base = {k: os.environ[k] for k in ("PATH", "PYTHONPATH", "HOME") if k in os.environ}
    proc_env = {**base, **cluster.env(), **env, "AWS_EC2_METADATA_DISABLED": "true"}
    assert not {k for k in proc_env if k.startswith("AWS_")} - {
        *creds,
        "AWS_REGION",
        "AWS_EC2_METADATA_DISABLED",
    }
    code = "import sys; from esper.sidecar.sync import run_sync; sys.exit(run_sync())"
    argv = [sys.executable, "-c", code]
    proc = subprocess.Popen(
        argv, env=proc_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(lambda: proc.poll() is None and http_status(port, "/readyz") == 200, timeout=60)
        assert installed(tmp_path / "vol", "kernel-a", ref.sha256)
        assert read_index(tmp_path / "vol").get("kernel-a").namespace == ns
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "installed kernel-a" in out, out


# ---- configuration and parsing (no cluster) -------------------------------------------------------


def test_config_from_env(tmp_path: Path) -> None:
    cfg = SyncConfig.from_env(
        {
            "ESPER_KERNEL_DIR": str(tmp_path),
            "ESPER_KERNELS": " a, b ,,",
            "ESPER_TARGET": "cpu",
            "ESPER_NAMESPACE": "ml",
            "ESPER_SYNC_PORT": "9191",
        }
    )
    assert (
        cfg.kernels == ("a", "b") and cfg.namespace == "ml" and cfg.port == 9191 and cfg.targets == ("cpu",)
    )
    assert (
        SyncConfig.from_env(
            {"ESPER_KERNEL_DIR": "/k", "ESPER_KERNEL_SELECTOR": "a in (x,y),!b", "POD_NAMESPACE": "team"}
        ).namespace
        == "team"
    )
    with pytest.raises(ConfigError, match="ESPER_KERNEL_DIR: required"):
        SyncConfig.from_env({"ESPER_KERNELS": "a"})
    with pytest.raises(ConfigError) as err:
        SyncConfig.from_env(
            {
                "ESPER_KERNEL_DIR": "/k",
                "ESPER_KERNELS": "Bad_Name",
                "ESPER_SYNC_PORT": "x",
                "ESPER_TARGET": "tpu",
                "ESPER_STORE_URI": "gs://b/p",
            }
        )
    text = str(err.value)
    for var in ("ESPER_KERNELS", "ESPER_SYNC_PORT", "ESPER_TARGET", "ESPER_STORE_URI"):
        assert f"{var}:" in text, text
    with pytest.raises(ConfigError, match=r"ESPER_KERNELS .* and/or ESPER_KERNEL_SELECTOR"):
        SyncConfig.from_env({"ESPER_KERNEL_DIR": "/k"})
    with pytest.raises(ConfigError, match="ESPER_KERNEL_SELECTOR: invalid label selector"):
        SyncConfig.from_env({"ESPER_KERNEL_DIR": "/k", "ESPER_KERNEL_SELECTOR": "a in x"})


def test_trusted_keys_and_bundle_limit_from_env(tmp_path: Path) -> None:
    private, public = signing.generate_key_pair(tmp_path / "k")
    base = {"ESPER_KERNEL_DIR": str(tmp_path), "ESPER_KERNELS": "a"}
    cfg = SyncConfig.from_env(
        {**base, "ESPER_TRUSTED_KEYS": str(tmp_path / "k"), "ESPER_MAX_BUNDLE_BYTES": "1000"}
    )
    key_id = signing.key_id(signing.load_private_key(private).public_key())
    assert cfg.trusted().key_ids == [key_id] and cfg.max_bundle_bytes == 1000
    assert SyncConfig.from_env({**base, "ESPER_TRUSTED_KEYS": str(public)}).trusted().key_ids == [key_id]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"ESPER_TRUSTED_KEYS: .*no public keys"):
        SyncConfig.from_env({**base, "ESPER_TRUSTED_KEYS": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match=r"ESPER_TRUSTED_KEYS: cannot read key file .*missing.pub"):
        SyncConfig.from_env({**base, "ESPER_TRUSTED_KEYS": str(tmp_path / "missing.pub")})
    (tmp_path / "bad.pub").write_text("garbage")
    with pytest.raises(ConfigError, match=r"ESPER_TRUSTED_KEYS: .*not a PEM public key"):
        SyncConfig.from_env({**base, "ESPER_TRUSTED_KEYS": str(tmp_path / "bad.pub")})
    with pytest.raises(ConfigError, match="ESPER_MAX_BUNDLE_BYTES"):
        SyncConfig.from_env({**base, "ESPER_MAX_BUNDLE_BYTES": "0"})


def test_default_namespace_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from esper.sidecar import config as sync_config

    monkeypatch.setattr(sync_config, "SA_NAMESPACE_FILE", str(tmp_path / "namespace"))
    assert default_namespace({}) == "default"
    (tmp_path / "namespace").write_text("from-sa\n")
    assert default_namespace({}) == "from-sa"
    assert default_namespace({"POD_NAMESPACE": "downward"}) == "downward"


def test_selectors_and_artifact_uris() -> None:
    reqs = parse_selector("app=x, tier!=db, env in (a, b), zone notin (z), gpu, !spot")
    assert selector_matches(reqs, {"app": "x", "env": "a", "gpu": ""})
    assert not selector_matches(reqs, {"app": "x", "env": "a", "gpu": "", "spot": "1"})
    assert not selector_matches(reqs, {"app": "x", "env": "c", "gpu": ""})
    key = "a" * 64
    assert store_uri_of(f"s3://b/esper/kernels/{key}", key) == "s3://b/esper"
    assert store_uri_of(f"file:///s/kernels/{key}/", key) == "file:///s"
    with pytest.raises(ValueError, match="does not end with"):
        store_uri_of(f"s3://b/esper/kernels/{'b' * 64}", key)


def test_desired_of_filters_and_validates() -> None:
    obj = kernel("k", "a" * 64)
    assert desired_of(obj, "default") is None  # not Ready
    obj["status"] = {
        "phase": "Ready",
        "artifact": {"uri": "s3://b/kernels/" + "a" * 64, "sha256": "c" * 64, "size": 3},
    }
    d = desired_of(obj, "default")
    assert d is not None and d.entry.sha256 == "c" * 64 and d.entry.path == "kernels/k"
    assert desired_of(obj, "default", targets=("cuda-sm90",)) is None
    assert desired_of(obj, "default", targets=("cpu-avx512", "cpu")) is not None
    obj["status"]["artifact"]["sha256"] = "nope"
    with pytest.raises(ValueError, match="malformed"):
        desired_of(obj, "default")


def test_run_once_without_a_cluster_answers_from_a_fake_api(tmp_path: Path) -> None:
    """run_once/reconcile are plain calls: a fake CustomObjectsApi is enough."""
    key, _ = make_fake_bundle(tmp_path / "b")
    ref = open_store(str(tmp_path / "store")).put_bundle(key, tmp_path / "b")
    obj = kernel("kernel-a", key)
    obj["status"] = {"phase": "Ready", "artifact": ref.model_dump()}

    class FakeApi:
        items = [obj]

        def list_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            return {"metadata": {"resourceVersion": "1"}, "items": json.loads(json.dumps(self.items))}

    sync = KernelSync(SyncConfig(kernel_dir=tmp_path / "vol", kernels=("kernel-a",)), api_client=object())
    sync.api = FakeApi()  # type: ignore[assignment]
    try:
        assert sync.run_once() and sync.ready()
        assert installed(tmp_path / "vol", "kernel-a", ref.sha256)
        FakeApi.items = []
        assert sync.run_once()
        assert read_index(tmp_path / "vol").kernels == []
        assert not (tmp_path / "vol" / "kernels" / "kernel-a").exists()
    finally:
        sync.stop()


class _FakeWatchResponse:
    status = 200

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events

    def stream(self, amt: Any = None, decode_content: bool = False) -> Iterator[bytes]:
        for e in self.events:
            yield json.dumps(e).encode() + b"\n"

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


def test_watch_expiry_410_relists(tmp_path: Path) -> None:
    """410 Gone from a watch means events were lost: relist (level-triggered) rather than give up."""
    key, _ = make_fake_bundle(tmp_path / "b")
    ref = open_store(str(tmp_path / "store")).put_bundle(key, tmp_path / "b")
    obj = kernel("kernel-a", key)
    obj["status"] = {"phase": "Ready", "artifact": ref.model_dump()}
    idle = threading.Event()

    class FakeApi:
        lists = watches = 0

        def list_namespaced_custom_object(self, *args: Any, watch: bool = False, **kwargs: Any) -> Any:
            if not watch:
                FakeApi.lists += 1  # the kernel only shows up in the relist
                return {"metadata": {"resourceVersion": "5"}, "items": [obj] if FakeApi.lists > 1 else []}
            FakeApi.watches += 1
            if FakeApi.watches == 1:
                gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
                return _FakeWatchResponse([{"type": "ERROR", "object": gone}])
            idle.wait(0.05)  # an idle watch that times out: keeps the loop from spinning
            return _FakeWatchResponse([])

    sync = KernelSync(
        SyncConfig(kernel_dir=tmp_path / "vol", kernels=("kernel-a",), retry_base=0.05, retry_max=0.2),
        api_client=object(),
    )
    sync.api = FakeApi()  # type: ignore[assignment]
    sync.start()
    try:
        wait_for(lambda: installed(tmp_path / "vol", "kernel-a", ref.sha256))
        assert FakeApi.lists == 2
        assert metric(sync, "esper_sync_errors_total", kind="watch_expired") == 1
        assert metric(sync, "esper_sync_errors_total", kind="kube_api") == 0
    finally:
        idle.set()
        sync.stop()


@pytest.mark.cluster
def test_a_served_kernel_stays_installed_until_its_replacement_is(
    cluster: Cluster, sidecar: Factory, s3_bucket: str, tmp_path: Path
) -> None:
    """A Blueprint switching Kernels relabels them; training must never be left without one."""
    serving, retained = {"blueprint.esper.dev/mlp": "serving"}, {"blueprint.esper.dev/mlp": "retained"}
    _, ref_old = add_ready_kernel(cluster, s3_bucket, tmp_path, "kernel-old", 1, serving)
    store = SwitchStore(open_store(s3_bucket))
    sync, _ = sidecar(store=store, selector="blueprint.esper.dev/mlp=serving")
    vol = tmp_path / "vol"
    wait_for(lambda: installed(vol, "kernel-old", ref_old.sha256))
    store.gate.clear()  # the new bundle's download hangs until released
    _, ref_new = add_ready_kernel(cluster, s3_bucket, tmp_path, "kernel-new", 2, serving)
    cluster.patch("kernels", "kernel-old", {"metadata": {"labels": retained}})
    wait_for(lambda: "kernel-old" not in (sync._observed or {}) and "kernel-new" in sync._inflight)
    sync.reconcile()
    assert installed(vol, "kernel-old", ref_old.sha256)  # still served: no replacement yet
    assert read_index(vol).get("kernel-new") is None
    store.gate.set()
    wait_for(lambda: installed(vol, "kernel-new", ref_new.sha256))
    wait_for(
        lambda: read_index(vol).get("kernel-old") is None and not (vol / "kernels" / "kernel-old").exists()
    )
