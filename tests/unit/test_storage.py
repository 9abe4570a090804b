"""open_store URIs and the filesystem store; the store contract for both stores is in
tests/integration/test_s3_store.py."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from esper.artifact import (
    DATA_FILES,
    FORWARD,
    MANIFEST,
    MAX_SIGNATURE_BYTES,
    PARAMS,
    SIGNATURE,
    ArtifactError,
    read_manifest,
    verify_bundle,
    write_manifest,
)
from esper.signing import SignatureError, TrustedKeys
from esper.storage import BundleNotFound, LocalStore, StorageError, open_store
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


# --- the store contract on the filesystem (tests/integration runs it on S3 too) ----------------------


def _put(store: LocalStore, tmp_path: Path, seed: int = 0, **kw: Any) -> tuple[str, str]:
    key, sha = make_fake_bundle(tmp_path / f"src{seed}", seed=seed, **kw)
    store.put_bundle(key, tmp_path / f"src{seed}")
    return key, sha


def test_local_round_trip(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    key, sha = make_fake_bundle(tmp_path / "src")
    assert store.list_keys() == [] and not store.has_bundle(key)
    assert not (tmp_path / "store").exists()  # listing an empty store creates nothing
    ref = store.put_bundle(key, tmp_path / "src")
    assert ref.uri == f"{(tmp_path / 'store').as_uri()}/kernels/{key}"
    manifest = (tmp_path / "src" / MANIFEST).read_bytes()
    assert ref.sha256 == sha == hashlib.sha256(manifest).hexdigest()
    assert ref.size == sum((tmp_path / "src" / n).stat().st_size for n in (*DATA_FILES, MANIFEST))
    assert store.has_bundle(key) and store.list_keys() == [key]
    assert store.read_manifest(key).key == key
    assert store.read_manifest_bytes(key) == manifest
    assert store.read_signature_bytes(key) == (tmp_path / "src" / SIGNATURE).read_bytes()
    dest = tmp_path / "cache" / "current"  # its parent is created
    assert store.fetch_bundle(key, dest, sha, trusted=TrustedKeys.from_env()) == dest
    assert sorted(os.listdir(dest)) == sorted([*DATA_FILES, MANIFEST, SIGNATURE])
    for name in (*DATA_FILES, MANIFEST, SIGNATURE):
        assert (dest / name).read_bytes() == (tmp_path / "src" / name).read_bytes()
    assert os.listdir(dest.parent) == ["current"]
    assert repr(store) == f"LocalStore({str(tmp_path / 'store')!r})"


def test_local_list_ignores_hidden_and_partial_entries(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    keys = sorted(_put(store, tmp_path, seed)[0] for seed in (3, 1, 2))
    kernels = tmp_path / "store" / "kernels"
    (kernels / f".{keys[0]}.tmp-0123456789ab").mkdir()  # a copy in progress, manifest included
    (kernels / f".{keys[0]}.tmp-0123456789ab" / MANIFEST).write_bytes(b"{}")
    (kernels / "notakey").mkdir()
    (kernels / "notakey" / MANIFEST).write_bytes(b"{}")
    assert store.list_keys() == keys


def test_local_put_is_first_wins_unless_replace(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    key, sha1 = _put(store, tmp_path, 5)
    (tmp_path / "b").mkdir()
    for name in DATA_FILES:
        (tmp_path / "b" / name).write_bytes((tmp_path / "src5" / name).read_bytes())
    (tmp_path / "b" / FORWARD).write_bytes(b"recompiled")
    sha2, _ = write_manifest(tmp_path / "b", read_manifest(tmp_path / "src5"))
    assert store.put_bundle(key, tmp_path / "b").sha256 == sha1
    assert (tmp_path / "store" / "kernels" / key / FORWARD).read_bytes() != b"recompiled"
    ref = store.put_bundle(key, tmp_path / "b", replace=True)
    assert ref.sha256 == sha2 == hashlib.sha256((tmp_path / "b" / MANIFEST).read_bytes()).hexdigest()
    assert (tmp_path / "store" / "kernels" / key / FORWARD).read_bytes() == b"recompiled"
    assert os.listdir(tmp_path / "store" / "kernels") == [key]


def test_local_delete(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    k0, k1 = _put(store, tmp_path, 0)[0], _put(store, tmp_path, 1)[0]
    assert store.delete_bundle(k0) is True
    assert store.delete_bundle(k0) is False
    assert store.list_keys() == [k1]
    assert os.listdir(tmp_path / "store" / "kernels") == [k1]  # nothing left aside
    with pytest.raises(BundleNotFound, match=f"no bundle {k0} in {store.uri}"):
        store.read_manifest_bytes(k0)
    # A directory without a manifest is no bundle: removed, but reported as not there.
    other = "e" * 64
    (tmp_path / "store" / "kernels" / other).mkdir()
    (tmp_path / "store" / "kernels" / other / FORWARD).write_bytes(b"half")
    assert store.delete_bundle(other) is False
    assert os.listdir(tmp_path / "store" / "kernels") == [k1]


@pytest.mark.parametrize("name", [FORWARD, PARAMS, MANIFEST])
def test_local_fetch_refuses_a_changed_byte_and_keeps_dest(tmp_path: Path, name: str) -> None:
    store = LocalStore(tmp_path / "store")
    key, sha = _put(store, tmp_path)
    dest = tmp_path / "cache" / "current"
    dest.mkdir(parents=True)
    (dest / "old").write_text("previous bundle")
    stored = tmp_path / "store" / "kernels" / key / name
    data = bytearray(stored.read_bytes())
    data[7] ^= 0x80
    stored.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=name):
        store.fetch_bundle(key, dest, sha)
    assert os.listdir(dest) == ["old"] and os.listdir(dest.parent) == ["current"]


def test_local_fetch_sha_mismatch_names_both(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    key, sha = _put(store, tmp_path)
    with pytest.raises(ArtifactError) as info:
        store.fetch_bundle(key, tmp_path / "d", "0" * 64)
    assert str(info.value) == f"{store.bundle_uri(key)}/{MANIFEST}: sha256 is {sha}, expected {'0' * 64}"
    assert sorted(os.listdir(tmp_path)) == ["src0", "store"]


def test_local_fetch_skips_a_current_dest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "store")
    key, sha = _put(store, tmp_path)
    dest = tmp_path / "d"
    store.fetch_bundle(key, dest, sha)
    calls: list[str] = []
    real = LocalStore._download
    monkeypatch.setattr(LocalStore, "_download", lambda s, *a: calls.append(a[1]) or real(s, *a))
    inode = dest.stat().st_ino
    assert store.fetch_bundle(key, dest, sha, trusted=TrustedKeys.from_env()) == dest
    assert calls == [] and dest.stat().st_ino == inode
    store.fetch_bundle(key, dest)  # no sha to compare with: downloaded again
    assert sorted(calls) == sorted(DATA_FILES) and dest.stat().st_ino != inode
    calls.clear()
    inode = dest.stat().st_ino
    other = TrustedKeys([Ed25519PrivateKey.generate().public_key()])
    with pytest.raises(SignatureError, match="not trusted"):  # current, but no key trusted now signed it
        store.fetch_bundle(key, dest, sha, trusted=other)
    assert calls == [] and dest.stat().st_ino == inode
    calls.clear()
    (dest / PARAMS).write_bytes(b"damaged")
    store.fetch_bundle(key, dest, sha)
    assert sorted(calls) == sorted(DATA_FILES) and (dest / PARAMS).read_bytes() != b"damaged"


def test_local_fetch_downloads_into_a_hidden_sibling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sidecar removes leftovers whose names start with '.': a crashed fetch leaves only such."""
    store = LocalStore(tmp_path / "store")
    key, sha = _put(store, tmp_path)
    seen: list[str] = []
    real = LocalStore._download
    monkeypatch.setattr(
        LocalStore, "_download", lambda s, *a: seen.extend(os.listdir(a[2].parent.parent)) or real(s, *a)
    )
    store.fetch_bundle(key, tmp_path / "cache" / "current", sha)
    assert seen and all(re.fullmatch(r"\.current\.tmp-[0-9a-f]{12}", n) for n in set(seen))


def test_local_fetch_checks_the_signature_before_any_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "store")
    unsigned, _ = _put(store, tmp_path, 1, signed=False)
    signed, sha = _put(store, tmp_path, 2)
    monkeypatch.setattr(LocalStore, "_download", lambda *a: pytest.fail("downloaded before the check"))
    with pytest.raises(SignatureError, match="unsigned"):
        store.fetch_bundle(unsigned, tmp_path / "d", trusted=TrustedKeys.from_env())
    with pytest.raises(SignatureError, match=f"{store.bundle_uri(signed)}: signed by key .* not trusted"):
        store.fetch_bundle(
            signed, tmp_path / "d", sha, trusted=TrustedKeys([Ed25519PrivateKey.generate().public_key()])
        )
    assert sorted(os.listdir(tmp_path)) == ["src1", "src2", "store"]


def test_local_fetch_without_signature_writes_none(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    key, sha = _put(store, tmp_path, signed=False)
    assert store.read_signature_bytes(key) is None
    store.fetch_bundle(key, tmp_path / "d", sha)
    assert sorted(os.listdir(tmp_path / "d")) == sorted([*DATA_FILES, MANIFEST])


def test_local_fetch_max_bundle_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "store")
    key, sha = _put(store, tmp_path)
    total = sum((tmp_path / "src0" / n).stat().st_size for n in (*DATA_FILES, MANIFEST))
    store.fetch_bundle(key, tmp_path / "exact", sha, max_bundle_bytes=total)  # the limit is inclusive
    monkeypatch.setattr(LocalStore, "_download", lambda *a: pytest.fail("downloaded past the limit"))
    with pytest.raises(ArtifactError) as info:
        store.fetch_bundle(key, tmp_path / "d", sha, max_bundle_bytes=total - 1)
    assert (
        str(info.value)
        == f"{store.bundle_uri(key)}: bundle is {total} bytes, more than the {total - 1} allowed"
    )
    assert not (tmp_path / "d").exists()


def test_local_download_stops_at_the_recorded_size(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    key, sha = _put(store, tmp_path)
    stored = tmp_path / "store" / "kernels" / key / FORWARD
    stored.write_bytes(stored.read_bytes() + b"x")  # one byte more than the manifest records
    with pytest.raises(ArtifactError, match=f"{stored}: larger than the 4096 bytes"):
        store.fetch_bundle(key, tmp_path / "d", sha)
    stored.unlink()
    with pytest.raises(ArtifactError) as info:
        store.fetch_bundle(key, tmp_path / "d", sha)
    assert str(info.value) == f"{stored}: listed in the manifest but missing from the store"
    assert sorted(os.listdir(tmp_path)) == ["src0", "store"]


def test_local_signature_size_limit(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    key, _ = _put(store, tmp_path)
    sig = tmp_path / "store" / "kernels" / key / SIGNATURE
    sig.write_bytes(b"s" * MAX_SIGNATURE_BYTES)
    assert store.read_signature_bytes(key) == b"s" * MAX_SIGNATURE_BYTES
    sig.write_bytes(b"s" * (MAX_SIGNATURE_BYTES + 1))
    with pytest.raises(ArtifactError) as info:
        store.read_signature_bytes(key)
    assert str(info.value) == f"{sig}: larger than {MAX_SIGNATURE_BYTES} bytes"


def test_local_read_manifest_names_the_bundle(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    key, _ = _put(store, tmp_path)
    (tmp_path / "store" / "kernels" / key / MANIFEST).write_bytes(b"not json")
    with pytest.raises(ArtifactError, match=re.escape(f"{store.bundle_uri(key)}/{MANIFEST}")):
        store.read_manifest(key)
    assert store.has_bundle(key)  # a manifest exists: present, if unreadable


def test_local_os_errors_are_storage_errors(tmp_path: Path) -> None:
    """Anything but a missing file is the store failing (transient, retried), not a missing bundle."""
    key, _ = make_fake_bundle(tmp_path / "src")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "kernels").write_text("a file where the kernels directory belongs")
    store = LocalStore(tmp_path / "store")
    with pytest.raises(StorageError, match=f"cannot write {tmp_path / 'store' / 'kernels' / key}: "):
        store.put_bundle(key, tmp_path / "src", replace=True)
    assert store.list_keys() == []
    with pytest.raises(
        StorageError, match=f"cannot read {tmp_path / 'store' / 'kernels' / key / MANIFEST}: "
    ):
        store.read_manifest_bytes(key)
    with pytest.raises(
        StorageError, match=f"cannot read {tmp_path / 'store' / 'kernels' / key / SIGNATURE}: "
    ):
        store.read_signature_bytes(key)
    with pytest.raises(StorageError, match="cannot read"):
        store.has_bundle(key)


def test_local_delete_and_list_errors_are_storage_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "store")
    key, _ = _put(store, tmp_path)

    def refuse(*_: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "rename", refuse)
    with pytest.raises(StorageError, match=f"cannot delete {tmp_path / 'store' / 'kernels' / key}: "):
        store.delete_bundle(key)
    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(StorageError, match=f"cannot list {tmp_path / 'store' / 'kernels'}: "):
        store.list_keys()


def test_exchange_without_renameat2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    assert storage_base._exchange(a, b) is False  # b does not exist: the call fails, nothing moves
    assert a.is_dir() and not b.exists()
    b.mkdir()

    def no_libc(*_: object, **__: object) -> None:
        raise OSError("no libc")

    monkeypatch.setattr(storage_base.ctypes, "CDLL", no_libc)
    assert storage_base._exchange(a, b) is False


def test_install_over_a_file_and_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "store")
    key, sha = _put(store, tmp_path)
    dest = tmp_path / "cache" / "current"
    dest.parent.mkdir()
    dest.write_text("a stray file")
    store.fetch_bundle(key, dest, sha)  # a regular file in the way is replaced, not left aside
    assert dest.is_dir() and os.listdir(dest.parent) == ["current"]

    real_rename = os.rename

    def fail_into_dest(src: Any, dst: Any) -> None:
        if Path(dst) == dest and ".tmp-" in Path(src).name:
            raise OSError(errno.EACCES, "refused")
        real_rename(src, dst)

    # The fallback (no renameat2) puts the old bundle back when the new one cannot move in.
    monkeypatch.setattr(storage_base, "_exchange", lambda a, b: False)
    monkeypatch.setattr(storage_base.os, "rename", fail_into_dest)
    inode = dest.stat().st_ino
    with pytest.raises(OSError, match="refused"):
        store.fetch_bundle(key, dest)
    assert dest.stat().st_ino == inode and os.listdir(dest.parent) == ["current"]
    shutil.rmtree(dest)  # no dest: a failure other than "someone else installed it" is raised
    with pytest.raises(OSError, match="refused"):
        store.fetch_bundle(key, dest, sha)
    assert os.listdir(dest.parent) == []


def test_install_when_another_fetch_won(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A concurrent fetch installing dest first is not an error: dest is swapped with the new copy."""
    store = LocalStore(tmp_path / "store")
    key, sha = _put(store, tmp_path)
    dest = tmp_path / "current"
    real_rename = os.rename
    raced: list[int] = []

    def race(src: Any, dst: Any) -> None:
        if Path(dst) == dest and not raced:
            dest.mkdir()
            (dest / "other").write_text("installed by another fetch")
            raced.append(1)
        real_rename(src, dst)

    monkeypatch.setattr(storage_base.os, "rename", race)
    store.fetch_bundle(key, dest, sha)
    assert raced and verify_bundle(dest, sha, expected_key=key)
    assert sorted(os.listdir(tmp_path)) == ["current", "src0", "store"]


def test_bundle_uri_of_a_store_at_the_root() -> None:
    key = "a" * 64
    assert LocalStore("/").uri == "file:///"
    assert LocalStore("/").bundle_uri(key) == f"file:///kernels/{key}"  # the root's slash stays, once


def test_exchange_with_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths are resolved against the working directory (AT_FDCWD), as os.rename does."""
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text(name)
    assert storage_base._exchange(Path("a"), Path("b"))
    assert ((tmp_path / "a" / "x").read_text(), (tmp_path / "b" / "x").read_text()) == ("b", "a")


def test_fetch_creates_missing_parents(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    key, sha = _put(store, tmp_path)
    dest = tmp_path / "a" / "b" / "current"
    store.fetch_bundle(key, dest, sha)
    assert verify_bundle(dest, sha, expected_key=key).key == key


def test_fetch_replaces_a_valid_dest_of_another_bundle(tmp_path: Path) -> None:
    """A dest holding a complete bundle of the same key, but not the one asked for, is downloaded again."""
    store = LocalStore(tmp_path / "store")
    key, sha1 = _put(store, tmp_path)
    dest = tmp_path / "current"
    store.fetch_bundle(key, dest, sha1)
    (tmp_path / "b").mkdir()
    for name in DATA_FILES:
        (tmp_path / "b" / name).write_bytes((tmp_path / "src0" / name).read_bytes())
    (tmp_path / "b" / FORWARD).write_bytes(b"recompiled")
    sha2, _ = write_manifest(tmp_path / "b", read_manifest(tmp_path / "src0"))
    store.put_bundle(key, tmp_path / "b", replace=True)
    store.fetch_bundle(key, dest, sha2)
    assert (dest / FORWARD).read_bytes() == b"recompiled"
    assert hashlib.sha256((dest / MANIFEST).read_bytes()).hexdigest() == sha2


def test_fetch_refuses_a_bundle_stored_under_another_key(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    key, _ = _put(store, tmp_path)
    wrong = "b" * 64
    (tmp_path / "store" / "kernels" / key).rename(tmp_path / "store" / "kernels" / wrong)
    with pytest.raises(ArtifactError, match=f"key is {key}, expected {wrong}"):
        store.fetch_bundle(wrong, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_an_unreadable_stored_manifest_is_named(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    key, _ = _put(store, tmp_path)
    (tmp_path / "store" / "kernels" / key / MANIFEST).write_bytes(b"not json")
    where = re.escape(f"{store.bundle_uri(key)}/{MANIFEST}: ")
    with pytest.raises(ArtifactError, match=f"^{where}"):
        store.fetch_bundle(key, tmp_path / "d")
    with pytest.raises(ArtifactError, match=f"^{where}"):  # what a put that finds it reports
        store.put_bundle(key, tmp_path / "src0")


def test_a_download_error_names_the_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    key, sha = _put(store, tmp_path)
    stored = tmp_path / "store" / "kernels" / key / FORWARD
    stored.unlink()
    stored.mkdir()  # not a readable file: the store is broken, not the bundle
    with pytest.raises(StorageError, match=f"^cannot copy {stored}: "):
        store.fetch_bundle(key, tmp_path / "d", sha)


def test_put_checks_what_it_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source changed between the check and the copy (here: swapped for another key's bundle) is refused."""
    from esper.storage import local

    store = LocalStore(tmp_path / "store")
    key, _ = make_fake_bundle(tmp_path / "src")
    other, _ = make_fake_bundle(tmp_path / "other", seed=9)
    real = shutil.copytree
    monkeypatch.setattr(local.shutil, "copytree", lambda src, dst: real(tmp_path / "other", dst))
    with pytest.raises(ArtifactError, match=f"key is {other}, expected {key}"):
        store.put_bundle(key, tmp_path / "src")
    assert store.list_keys() == [] and os.listdir(tmp_path / "store" / "kernels") == []


def test_a_signature_is_read_at_most_one_byte_past_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from esper.storage import local

    store = LocalStore(tmp_path / "store")
    key, _ = _put(store, tmp_path)
    (tmp_path / "store" / "kernels" / key / SIGNATURE).write_bytes(b"s" * (3 * MAX_SIGNATURE_BYTES))
    asked: list[int | None] = []

    class Recording:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Recording:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def read(self, n: int | None = None) -> bytes:
            asked.append(n)
            return self.f.read(n)

    monkeypatch.setattr(local, "open", lambda path, mode: Recording(open(path, mode)), raising=False)  # noqa: SIM115
    with pytest.raises(ArtifactError, match="larger than"):
        store.read_signature_bytes(key)
    assert asked == [MAX_SIGNATURE_BYTES + 1]


def test_a_failed_cleanup_of_the_old_bundle_does_not_fail_the_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new bundle is in place by then; a leftover `.old-` directory is the sidecar's to remove."""
    store = LocalStore(tmp_path / "store")
    k1, s1 = _put(store, tmp_path, 1)
    k2, s2 = _put(store, tmp_path, 2)
    dest = tmp_path / "cache" / "current"
    store.fetch_bundle(k1, dest, s1)
    real = shutil.rmtree

    def rmtree(path: Any, ignore_errors: bool = False) -> None:
        if ".old-" in Path(path).name and not ignore_errors:
            raise PermissionError(13, "Permission denied", str(path))
        real(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(storage_base, "_exchange", lambda a, b: False)
    monkeypatch.setattr(storage_base.shutil, "rmtree", rmtree)
    store.fetch_bundle(k2, dest, s2)
    assert verify_bundle(dest, s2, expected_key=k2).key == k2


def test_a_current_dest_must_also_hold_the_key_asked_for(tmp_path: Path) -> None:
    """A sha256 that names another key's bundle (a Kernel whose key and sha disagree) is not taken
    from the cache: the store's bundle is fetched and refused."""
    store = LocalStore(tmp_path / "store")
    k1, _ = _put(store, tmp_path, 1)
    k2, s2 = _put(store, tmp_path, 2)
    dest = tmp_path / "current"
    store.fetch_bundle(k2, dest, s2)
    with pytest.raises(ArtifactError, match=f"expected {s2}"):
        store.fetch_bundle(k1, dest, s2)
    assert verify_bundle(dest, s2).key == k2  # left as it was
