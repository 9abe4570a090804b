"""The sidecar installs only the bundle whose manifest sha256 is the one in the Kernel's status.

A bundle that verifies on its own (right key, every file matching its manifest) but is not the one the
operator recorded must be refused: that is the only thing that ties what a pod loads to the Kernel.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiClient

from esper.artifact import FORWARD, MANIFEST, ArtifactError, verify_bundle
from esper.sidecar.index import read_index
from esper.sidecar.sync import KernelSync, SyncConfig, desired_of
from esper.storage import LocalStore
from tests.support.s3 import make_fake_bundle


def _kernel(name: str, key: str, uri: str, sha256: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"blueprint": "mlp", "target": "cpu", "key": key},
        "status": {"phase": "Ready", "artifact": {"uri": uri, "sha256": sha256, "size": 1}},
    }


@pytest.fixture
def two_bundles(tmp_path: Path) -> tuple[LocalStore, str, str, str]:
    """A store holding bundle B under key K, and the sha256s of A and B: two valid bundles of one key."""
    key_a, _ = make_fake_bundle(tmp_path / "a", seed=7, size=512)
    key_b, _ = make_fake_bundle(tmp_path / "b", seed=7, size=640)  # same key, other bytes
    assert key_a == key_b
    sha_a = hashlib.sha256((tmp_path / "a" / MANIFEST).read_bytes()).hexdigest()
    sha_b = hashlib.sha256((tmp_path / "b" / MANIFEST).read_bytes()).hexdigest()
    assert sha_a != sha_b
    store = LocalStore(tmp_path / "store")
    store.put_bundle(key_b, tmp_path / "b")
    return store, key_b, sha_a, sha_b


def _sync(tmp_path: Path) -> KernelSync:
    return KernelSync(
        SyncConfig(kernel_dir=tmp_path / "vol", kernels=("k",), namespace="ns"),
        api_client=ApiClient(),  # never called: events are fed by hand
    )


def test_a_valid_bundle_that_is_not_the_recorded_one_is_refused(
    tmp_path: Path, two_bundles: tuple[LocalStore, str, str, str]
) -> None:
    store, key, sha_a, sha_b = two_bundles
    sync = _sync(tmp_path)
    try:
        sync.apply_event({"type": "ADDED", "object": _kernel("k", key, store.bundle_uri(key), sha_a)})
        assert sync.reconcile(wait=True) is False
        assert f"sha256 is {sha_b}, expected {sha_a}" in sync.failures()["k"]
        vol = tmp_path / "vol"
        assert read_index(vol).get("k") is None
        assert sorted(p.name for p in (vol / "kernels").iterdir()) == []

        # the status now names the bundle that is there: it is installed, and it is that bundle
        sync.apply_event({"type": "MODIFIED", "object": _kernel("k", key, store.bundle_uri(key), sha_b)})
        assert sync.reconcile(wait=True) is True  # a new sha256 is fetched at once, no backoff
        assert sync.failures() == {}
        entry = read_index(vol).get("k")
        assert entry is not None and entry.sha256 == sha_b
        assert hashlib.sha256((entry.bundle_dir(vol) / MANIFEST).read_bytes()).hexdigest() == sha_b
    finally:
        sync.stop()


def test_fetch_bundle_checks_the_expected_sha256(
    tmp_path: Path, two_bundles: tuple[LocalStore, str, str, str]
) -> None:
    store, key, sha_a, sha_b = two_bundles
    with pytest.raises(ArtifactError, match=f"sha256 is {sha_b}, expected {sha_a}"):
        store.fetch_bundle(key, tmp_path / "dest", expected_sha256=sha_a)
    assert not (tmp_path / "dest").exists()
    store.fetch_bundle(key, tmp_path / "dest", expected_sha256=sha_b)
    assert verify_bundle(tmp_path / "dest", sha_b, expected_key=key).key == key


def test_fetch_bundle_verifies_every_file_it_downloads(tmp_path: Path) -> None:
    """The manifest matches, a data file in the store does not: nothing is installed."""
    key, sha = make_fake_bundle(tmp_path / "a", seed=8, size=512)
    store = LocalStore(tmp_path / "store")
    store.put_bundle(key, tmp_path / "a")
    (tmp_path / "store" / "kernels" / key / FORWARD).write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match=f"{FORWARD}: size is 8 bytes, manifest says 512"):
        store.fetch_bundle(key, tmp_path / "dest", expected_sha256=sha)
    assert not (tmp_path / "dest").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "store"]  # no temp download left


def test_only_kernels_of_the_pods_target_are_wanted() -> None:
    cpu = _kernel("k", "a" * 64, "s3://b/p/kernels/" + "a" * 64, "b" * 64)
    gpu = {**cpu, "spec": {**cpu["spec"], "target": "cuda-sm90"}}
    assert desired_of(cpu, "ns", "cpu") is not None and desired_of(cpu, "ns", None) is not None
    assert desired_of(gpu, "ns", "cpu") is None
    d = desired_of(gpu, "ns", "cuda-sm90")
    assert d is not None and (d.entry.target, d.entry.sha256, d.bundle_uri) == (
        "cuda-sm90",
        "b" * 64,
        cpu["status"]["artifact"]["uri"],
    )
