"""The Store interface: where kernel bundles live, and the rules every store keeps.

- A bundle becomes visible only when its manifest.json exists, and the manifest is written last:
  a reader never sees a partial upload. Deletion removes the manifest first for the same reason.
- A fetch downloads into a temporary sibling of the destination, verifies everything, and only then
  renames it into place: the destination is never left half-written or unverified.
- Errors: `StorageError` is transient (network, 5xx, throttling; retry later, the compile Job exits 75),
  `BundleNotFound` means no complete bundle under that key, `artifact.ArtifactError` means bad content.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from pathlib import Path

from esper.artifact import (
    MANIFEST,
    SIGNATURE,
    ArtifactError,
    Manifest,
    Verifier,
    bundle_size,
    check_key,
    parse_manifest,
    sha256_bytes,
    verify_bundle,
)
from esper.contracts.common import ArtifactRef

KERNELS_DIR = "kernels"


class StorageError(Exception):
    """The store could not be reached or refused the request; transient, worth retrying."""


class BundleNotFound(LookupError):
    """No complete bundle (no manifest.json) under this key."""


class Store(ABC):
    """A place that holds kernel bundles under `kernels/<key>/`."""

    @property
    @abstractmethod
    def uri(self) -> str:
        """The store's URI (what `open_store` accepts)."""

    def bundle_uri(self, key: str) -> str:
        """The URI of one bundle, as recorded in a Kernel's status."""
        return f"{self.uri.removesuffix('/')}/{KERNELS_DIR}/{check_key(key)}"  # file:/// keeps its root

    @abstractmethod
    def put_bundle(self, key: str, local_dir: Path, *, replace: bool = False) -> ArtifactRef:
        """Upload a verified local bundle, manifest last.

        If a complete bundle already exists under `key` it is kept and its ref returned (the first
        complete upload wins, so a retried compile Job reports what readers will actually fetch),
        unless `replace` is true.
        """

    @abstractmethod
    def list_keys(self) -> list[str]:
        """Keys of complete bundles (those whose manifest exists), sorted."""

    @abstractmethod
    def delete_bundle(self, key: str) -> bool:
        """Delete a bundle, manifest first; False if there was none."""

    @abstractmethod
    def read_manifest_bytes(self, key: str) -> bytes:
        """The raw manifest.json of `key` (its sha256 is the bundle's identity); BundleNotFound if absent."""

    @abstractmethod
    def read_signature_bytes(self, key: str) -> bytes | None:
        """The raw manifest.sig of `key`, or None if the bundle is unsigned."""

    @abstractmethod
    def _download(self, key: str, name: str, dest: Path, max_bytes: int) -> None:
        """Copy one bundle file to `dest`, refusing (ArtifactError) one longer than `max_bytes`: a
        swapped object is never downloaded past what the manifest promised."""

    def has_bundle(self, key: str) -> bool:
        """Whether a complete bundle exists under `key`."""
        try:
            self.read_manifest_bytes(check_key(key))
        except BundleNotFound:
            return False
        return True

    def read_manifest(self, key: str) -> Manifest:
        """The stored manifest of `key` (its data files are not checked)."""
        return parse_manifest(self.read_manifest_bytes(check_key(key)), f"{self.bundle_uri(key)}/{MANIFEST}")

    def _existing_ref(self, key: str) -> ArtifactRef | None:
        try:
            data = self.read_manifest_bytes(key)
        except BundleNotFound:
            return None
        manifest = parse_manifest(data, f"{self.bundle_uri(key)}/{MANIFEST}")
        return ArtifactRef(
            uri=self.bundle_uri(key), sha256=sha256_bytes(data), size=bundle_size(manifest, data)
        )

    def fetch_bundle(
        self,
        key: str,
        dest_dir: Path,
        expected_sha256: str | None = None,
        *,
        trusted: Verifier | None = None,
        max_bundle_bytes: int | None = None,
    ) -> Path:
        """Download, verify and atomically install the bundle at `dest_dir`; returns `dest_dir`.

        With `trusted`, the manifest's signature is checked before any data file is downloaded; each
        download stops at the size the manifest records, and a bundle larger than `max_bundle_bytes`
        is refused before its first data byte. If `dest_dir` already holds a bundle that verifies
        (against `expected_sha256` and `trusted`), nothing is downloaded. On any failure the
        temporary download is removed and `dest_dir` is untouched.
        """
        check_key(key)
        dest = Path(dest_dir)
        if expected_sha256 is not None and dest.is_dir():
            with contextlib.suppress(ArtifactError):
                verify_bundle(dest, expected_sha256, expected_key=key, trusted=trusted)
                return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            data = self.read_manifest_bytes(key)
            signature = self.read_signature_bytes(key)
            source = f"{self.bundle_uri(key)}"
            if trusted is not None:
                trusted.verify(data, signature, source)
            if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
                raise ArtifactError(
                    f"{source}/{MANIFEST}: sha256 is {sha256_bytes(data)}, expected {expected_sha256}"
                )
            manifest = parse_manifest(data, f"{source}/{MANIFEST}")  # file names are checked plain here
            total = bundle_size(manifest, data)
            if max_bundle_bytes is not None and total > max_bundle_bytes:
                raise ArtifactError(
                    f"{source}: bundle is {total} bytes, more than the {max_bundle_bytes} allowed"
                )
            for name, entry in manifest.files.items():
                self._download(key, name, tmp / name, entry.size)
            (tmp / MANIFEST).write_bytes(data)
            if signature is not None:
                (tmp / SIGNATURE).write_bytes(signature)
            verify_bundle(tmp, expected_sha256, expected_key=key, trusted=trusted)
            _install(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _install(tmp: Path, dest: Path) -> None:
    """Move the verified `tmp` to `dest`; an existing `dest` is swapped out atomically where possible.

    Afterwards `tmp` holds the old contents (or nothing) and the caller removes it.
    """
    if not dest.exists() and not dest.is_symlink():
        try:
            os.rename(tmp, dest)
            return
        except OSError as e:  # another fetch installed it meanwhile: swap below
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if dest.is_dir() and not dest.is_symlink() and _exchange(tmp, dest):
        return
    # Fallback: rename aside, then into place (a brief window without dest).
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except OSError:
        os.rename(old, dest)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
