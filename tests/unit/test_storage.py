"""open_store URIs and the filesystem store; the store contract for both stores is in
tests/integration/test_s3_store.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from esper.artifact import FORWARD, MANIFEST, ArtifactError
from esper.storage import BundleNotFound, LocalStore, open_store
from esper.storage import base as storage_base
from esper.storage.s3 import S3Store
from tests.support.s3 import make_fake_bundle


@pytest.mark.parametrize(
    ("uri", "kind", "where"),
    [
        ("s3://esper-kernels", S3Store, ("esper-kernels", "")),
        ("s3://esper-kernels/", S3Store, ("esper-kernels", "")),
        ("s3://esper-kernels/team/a/", S3Store, ("esper-kernels", "team/a")),
        ("s3://my.bucket-1/p", S3Store, ("my.bucket-1", "p")),
        ("file:///var/esper", LocalStore, Path("/var/esper")),
        ("file://localhost/var/esper", LocalStore, Path("/var/esper")),
        ("file:///var/with%20space", LocalStore, Path("/var/with space")),
        ("/var/esper", LocalStore, Path("/var/esper")),
        ("relative/dir", LocalStore, Path("relative/dir").absolute()),
    ],
)
def test_open_store(uri: str, kind: type, where: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    store = open_store(uri)
    assert isinstance(store, kind)
    if isinstance(store, S3Store):
        assert (store.bucket, store.prefix) == where
        assert store.client.meta.region_name  # a client is built without network access
    else:
        assert store.root == where
        assert store.uri == where.as_uri()


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
        ("s3://ab/prefix", "bucket name 'ab'"),
        ("s3://Upper/x", "bucket name 'Upper'"),
        ("s3://-bucket/x", "bucket name"),
        ("s3://a..b/x", "bucket name"),
        ("gs://bucket/x", "unsupported store URI scheme 'gs'"),
        ("http://host/x", "unsupported store URI scheme 'http'"),
        ("file://host/path", "file:///absolute/path"),
        ("", "empty store URI"),
    ],
)
def test_open_store_rejects(uri: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        open_store(uri)


def test_bundle_uri(tmp_path: Path) -> None:
    key = "0" * 64
    assert LocalStore(tmp_path).bundle_uri(key) == f"{tmp_path.as_uri()}/kernels/{key}"
    assert S3Store("bkt", "/p/", client=object()).bundle_uri(key) == f"s3://bkt/p/kernels/{key}"
    assert S3Store("bkt", client=object()).bundle_uri(key) == f"s3://bkt/kernels/{key}"


@pytest.mark.parametrize("key", ["../" + "0" * 61, "A" * 64, "0" * 63, "", "0" * 64 + "/x"])
def test_keys_are_validated(tmp_path: Path, key: str) -> None:
    store = LocalStore(tmp_path)
    for call in (store.has_bundle, store.read_manifest, store.delete_bundle, store.bundle_uri):
        with pytest.raises(ValueError, match="invalid kernel key"):
            call(key)
    with pytest.raises(ValueError, match="invalid kernel key"):
        store.fetch_bundle(key, tmp_path / "d")


def test_local_layout_and_partial_dir_invisible(tmp_path: Path) -> None:
    key, sha = make_fake_bundle(tmp_path / "src")
    store = LocalStore(tmp_path / "store")
    ref = store.put_bundle(key, tmp_path / "src")
    assert ref.sha256 == sha and (tmp_path / "store" / "kernels" / key / MANIFEST).is_file()
    assert [p.name for p in (tmp_path / "store" / "kernels").iterdir()] == [key]  # no temp leftovers
    # A directory without a manifest (e.g. a crashed copy by hand) is not a bundle.
    other, _ = make_fake_bundle(tmp_path / "src2", seed=1)
    partial = tmp_path / "store" / "kernels" / other
    partial.mkdir()
    (partial / FORWARD).write_bytes(b"half")
    assert store.list_keys() == [key]
    with pytest.raises(BundleNotFound):
        store.fetch_bundle(other, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_put_refuses_a_bad_local_bundle(tmp_path: Path) -> None:
    key, _ = make_fake_bundle(tmp_path / "src")
    (tmp_path / "src" / FORWARD).write_bytes(b"tampered")
    store = LocalStore(tmp_path / "store")
    with pytest.raises(ArtifactError, match=FORWARD):
        store.put_bundle(key, tmp_path / "src")
    with pytest.raises(ArtifactError, match="key is"):
        store.put_bundle("f" * 64, tmp_path / "src")
    assert store.list_keys() == []


def test_exchange_swaps_directories(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert storage_base._exchange(a, b)
    assert ((a / "x").read_text(), (b / "x").read_text()) == ("b", "a")


def test_fetch_replace_falls_back_without_exchange(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "store")
    k1, s1 = make_fake_bundle(tmp_path / "b1", seed=1)
    k2, s2 = make_fake_bundle(tmp_path / "b2", seed=2)
    store.put_bundle(k1, tmp_path / "b1")
    store.put_bundle(k2, tmp_path / "b2")
    dest = tmp_path / "cache" / "current"
    store.fetch_bundle(k1, dest, s1)
    monkeypatch.setattr(storage_base, "_exchange", lambda a, b: False)
    store.fetch_bundle(k2, dest, s2)
    assert (dest / FORWARD).read_bytes() == (tmp_path / "b2" / FORWARD).read_bytes()
    assert os.listdir(dest.parent) == ["current"]


def test_fetch_replaces_a_symlinked_dest(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    key, _ = make_fake_bundle(tmp_path / "src")
    store.put_bundle(key, tmp_path / "src")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "current").symlink_to(tmp_path / "src")
    store.fetch_bundle(key, tmp_path / "cache" / "current")  # no sha: always downloads
    assert not (tmp_path / "cache" / "current").is_symlink()
    assert os.listdir(tmp_path / "cache") == ["current"]
    assert (tmp_path / "src" / MANIFEST).is_file()  # the symlink's target is left alone
