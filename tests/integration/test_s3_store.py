"""The store contract, run against LocalStore and S3Store (moto server), plus S3-specific failures."""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from esper.artifact import (
    DATA_FILES,
    FORWARD,
    MANIFEST,
    PARAMS,
    SIGNATURE,
    TRAIN_BACKWARD,
    TRAIN_FORWARD,
    ArtifactError,
    read_manifest,
    sha256_bytes,
    verify_bundle,
    write_manifest,
)
from esper.storage import BundleNotFound, LocalStore, StorageError, Store, open_store
from esper.storage import base as storage_base
from esper.storage.s3 import S3Store
from tests.support.s3 import make_fake_bundle, s3_bucket, s3_server  # noqa: F401


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_bucket"))


def _raw_client(store: S3Store) -> Any:
    return boto3.client("s3", endpoint_url=os.environ["ESPER_S3_ENDPOINT"], region_name="us-east-1")


def _corrupt(store: Store, key: str, name: str) -> None:
    """Flip one byte of a stored file, behind the store's back."""
    if isinstance(store, LocalStore):
        path = store.root / "kernels" / key / name
        data = bytearray(path.read_bytes())
        data[7] ^= 0x80
        path.write_bytes(bytes(data))
        return
    assert isinstance(store, S3Store)
    client, obj = _raw_client(store), store._object(key, name)
    data = bytearray(client.get_object(Bucket=store.bucket, Key=obj)["Body"].read())
    data[7] ^= 0x80
    client.put_object(Bucket=store.bucket, Key=obj, Body=bytes(data))


def _siblings(dest: Path) -> list[str]:
    return sorted(os.listdir(dest.parent))


def test_round_trip(store: Store, tmp_path: Path) -> None:
    key, sha = make_fake_bundle(tmp_path / "src")
    assert store.list_keys() == [] and not store.has_bundle(key)
    ref = store.put_bundle(key, tmp_path / "src")
    assert ref.uri == store.bundle_uri(key) and ref.uri.startswith(store.uri)
    assert ref.sha256 == sha
    counted = [p for p in (tmp_path / "src").iterdir() if p.name != SIGNATURE]  # the size counts no signature
    assert ref.size == sum(p.stat().st_size for p in counted)
    assert store.list_keys() == [key] and store.has_bundle(key)
    assert store.read_manifest(key).key == key
    assert sha256_bytes(store.read_manifest_bytes(key)) == sha
    dest = tmp_path / "cache" / key
    assert store.fetch_bundle(key, dest, sha) == dest
    assert verify_bundle(dest, sha).key == key
    for name in (*DATA_FILES, SIGNATURE):  # the signature travels with the bundle
        assert (dest / name).read_bytes() == (tmp_path / "src" / name).read_bytes()
    assert _siblings(dest) == [key]  # no temporary directory left behind


def test_list_and_delete(store: Store, tmp_path: Path) -> None:
    keys = []
    for seed in range(3):
        key, _ = make_fake_bundle(tmp_path / f"b{seed}", seed=seed)
        store.put_bundle(key, tmp_path / f"b{seed}")
        keys.append(key)
    assert store.list_keys() == sorted(keys)
    assert store.delete_bundle(keys[1]) is True
    assert store.delete_bundle(keys[1]) is False
    assert store.list_keys() == sorted([keys[0], keys[2]])
    with pytest.raises(BundleNotFound):
        store.read_manifest(keys[1])
    with pytest.raises(BundleNotFound):
        store.fetch_bundle(keys[1], tmp_path / "d")


def test_put_is_first_wins_unless_replace(store: Store, tmp_path: Path) -> None:
    key, sha1 = make_fake_bundle(tmp_path / "a", seed=5)
    store.put_bundle(key, tmp_path / "a")
    # A recompile of the same key (e.g. a retried Job) gives different bytes: the stored bundle stays.
    (tmp_path / "b").mkdir()
    for name in (*DATA_FILES, MANIFEST):
        (tmp_path / "b" / name).write_bytes((tmp_path / "a" / name).read_bytes())
    (tmp_path / "b" / FORWARD).write_bytes(b"recompiled")
    sha2, _ = write_manifest(tmp_path / "b", read_manifest(tmp_path / "b"))
    assert store.put_bundle(key, tmp_path / "b").sha256 == sha1
    assert store.put_bundle(key, tmp_path / "b", replace=True).sha256 == sha2
    store.fetch_bundle(key, tmp_path / "d", sha2)
    assert (tmp_path / "d" / FORWARD).read_bytes() == b"recompiled"


@pytest.mark.parametrize("name", [FORWARD, TRAIN_FORWARD, TRAIN_BACKWARD, PARAMS, MANIFEST])
def test_corrupted_byte_detected_and_dest_untouched(store: Store, tmp_path: Path, name: str) -> None:
    key, sha = make_fake_bundle(tmp_path / "src")
    store.put_bundle(key, tmp_path / "src")
    dest = tmp_path / "cache" / "current"
    dest.mkdir(parents=True)
    (dest / "old").write_text("previous bundle")
    _corrupt(store, key, name)
    with pytest.raises(ArtifactError, match=name):
        store.fetch_bundle(key, dest, sha)
    assert os.listdir(dest) == ["old"] and (dest / "old").read_text() == "previous bundle"
    assert _siblings(dest) == ["current"]


def test_expected_sha_mismatch(store: Store, tmp_path: Path) -> None:
    key, _ = make_fake_bundle(tmp_path / "src")
    store.put_bundle(key, tmp_path / "src")
    with pytest.raises(ArtifactError, match=r"expected 0{64}"):
        store.fetch_bundle(key, tmp_path / "d", "0" * 64)
    assert not (tmp_path / "d").exists()


def test_fetch_into_existing_dest_replaces_atomically(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k1, s1 = make_fake_bundle(tmp_path / "b1", seed=1)
    k2, s2 = make_fake_bundle(tmp_path / "b2", seed=2)
    store.put_bundle(k1, tmp_path / "b1")
    store.put_bundle(k2, tmp_path / "b2")
    dest = tmp_path / "cache" / "current"
    store.fetch_bundle(k1, dest, s1)
    inode = dest.stat().st_ino

    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        assert Path(src) != dest, "dest was renamed away: readers would see it missing"
        real_rename(src, dst)

    monkeypatch.setattr(storage_base.os, "rename", rename)
    store.fetch_bundle(k2, dest, s2)
    assert verify_bundle(dest, s2, expected_key=k2)
    assert dest.stat().st_ino != inode
    assert _siblings(dest) == ["current"]


def test_fetch_skips_download_when_dest_is_current(store: Store, tmp_path: Path) -> None:
    key, sha = make_fake_bundle(tmp_path / "src")
    store.put_bundle(key, tmp_path / "src")
    dest = tmp_path / "d"
    store.fetch_bundle(key, dest, sha)
    inode = dest.stat().st_ino
    store.fetch_bundle(key, dest, sha)
    assert dest.stat().st_ino == inode
    (dest / PARAMS).write_bytes(b"damaged")  # a damaged cache is downloaded again
    store.fetch_bundle(key, dest, sha)
    assert verify_bundle(dest, sha) and dest.stat().st_ino != inode


# --- S3 only -------------------------------------------------------------------------------------


class FailingClient:
    """Wraps a boto3 client; fails the manifest PutObject the way a dropped connection would."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def put_object(self, **kwargs: Any) -> Any:
        if kwargs["Key"].endswith("/" + MANIFEST):
            raise EndpointConnectionError(endpoint_url="http://s3.invalid")
        return self._client.put_object(**kwargs)


def test_partial_upload_is_invisible(s3_bucket: str, tmp_path: Path) -> None:  # noqa: F811
    plain = open_store(s3_bucket)
    assert isinstance(plain, S3Store)
    failing = S3Store(plain.bucket, plain.prefix, client=FailingClient(plain.client))
    key, _ = make_fake_bundle(tmp_path / "src")
    with pytest.raises(StorageError, match="cannot reach"):
        failing.put_bundle(key, tmp_path / "src")
    stored = _raw_client(plain).list_objects_v2(Bucket=plain.bucket)["Contents"]
    landed = sorted(o["Key"].rsplit("/", 1)[1] for o in stored)
    assert landed == sorted((*DATA_FILES, SIGNATURE))  # data and signature did land, the manifest not
    assert plain.list_keys() == [] and not plain.has_bundle(key)
    with pytest.raises(BundleNotFound):
        plain.fetch_bundle(key, tmp_path / "d")
    assert not (tmp_path / "d").exists() and os.listdir(tmp_path) == ["src"]
    # A retry completes it.
    plain.put_bundle(key, tmp_path / "src")
    assert plain.list_keys() == [key]


def test_multipart_upload(s3_bucket: str, tmp_path: Path) -> None:  # noqa: F811
    store = open_store(s3_bucket, multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    key, sha = make_fake_bundle(tmp_path / "src", size=11 * 1024 * 1024)
    store.put_bundle(key, tmp_path / "src")
    assert isinstance(store, S3Store)
    head = _raw_client(store).head_object(Bucket=store.bucket, Key=store._object(key, FORWARD))
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    store.fetch_bundle(key, tmp_path / "d", sha)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_is_a_quick_storage_error(
    s3_bucket: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    store = S3Store(
        "esper-kernels", endpoint_url=endpoint, max_attempts=2, connect_timeout=0.5, read_timeout=1
    )
    key, _ = make_fake_bundle(tmp_path / "src")
    start = time.monotonic()
    for call in (
        store.list_keys,
        lambda: store.has_bundle(key),
        lambda: store.put_bundle(key, tmp_path / "src"),
    ):
        with pytest.raises(StorageError, match=re.escape(f"cannot reach s3://esper-kernels at {endpoint}")):
            call()
    with pytest.raises(StorageError):
        store.fetch_bundle(key, tmp_path / "d")
    assert time.monotonic() - start < 15
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_missing_bucket(s3_bucket: str) -> None:  # noqa: F811
    store = open_store("s3://esper-no-such-bucket/x")
    with pytest.raises(StorageError, match="bucket 'esper-no-such-bucket' does not exist"):
        store.list_keys()
    with pytest.raises(StorageError, match="does not exist"):
        store.has_bundle("0" * 64)


class DenyingClient(FailingClient):
    def get_object(self, **kwargs: Any) -> Any:
        raise ClientError(
            {"Error": {"Code": "AccessDenied", "Message": "no"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
            "GetObject",
        )


def test_access_denied(s3_bucket: str) -> None:  # noqa: F811
    plain = open_store(s3_bucket)
    assert isinstance(plain, S3Store)
    store = S3Store(plain.bucket, plain.prefix, client=DenyingClient(plain.client))
    with pytest.raises(StorageError, match=r"access denied .*check credentials"):
        store.read_manifest("0" * 64)


def test_debug_logging_never_shows_credentials(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With every logger at DEBUG (the operator's logLevel: debug), no access key id or request
    signature reaches the log; the SDK still logs at INFO and above."""
    import logging

    bucket = request.getfixturevalue("s3_bucket")  # created before the loggers go to DEBUG
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAESPERTESTKEYID01")
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.DEBUG)  # as a --debug switch leaves it
    caplog.set_level(logging.DEBUG)
    store = open_store(bucket)
    key, _ = make_fake_bundle(tmp_path / "b", size=64)
    store.put_bundle(key, tmp_path / "b")
    store.fetch_bundle(key, tmp_path / "d")
    text = caplog.text
    assert "AKIAESPERTESTKEYID01" not in text
    assert "Signature=" not in text and "AWS4-HMAC-SHA256" not in text
    assert logging.getLogger("botocore").getEffectiveLevel() == logging.INFO
