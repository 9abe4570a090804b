"""A store on a local (or mounted) filesystem: `<root>/kernels/<key>/`.

Puts go through a temporary sibling directory and a rename, so a bundle directory appears complete
or not at all; deletes rename the bundle aside first, so it vanishes at once.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from esper.artifact import (
    MANIFEST,
    MAX_SIGNATURE_BYTES,
    SIGNATURE,
    ArtifactError,
    check_key,
    copy_capped,
    is_key,
    verify_bundle,
)
from esper.contracts.common import ArtifactRef
from esper.storage.base import KERNELS_DIR, BundleNotFound, StorageError, Store, _install


@contextmanager
def _os_errors(what: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as e:
        raise StorageError(f"{what}: {e}") from e


class LocalStore(Store):
    """Bundles in a directory tree; also what tests and single-node setups use."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self._kernels = self.root / KERNELS_DIR

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _dir(self, key: str) -> Path:
        return self._kernels / check_key(key)

    def put_bundle(self, key: str, local_dir: Path, *, replace: bool = False) -> ArtifactRef:
        check_key(key)
        verify_bundle(local_dir, expected_key=key)
        if not replace and (existing := self._existing_ref(key)) is not None:
            return existing
        dest = self._dir(key)
        with _os_errors(f"cannot write {dest}"):
            self._kernels.mkdir(parents=True, exist_ok=True)
            tmp = self._kernels / f".{key}.tmp-{uuid.uuid4().hex[:12]}"
            try:
                shutil.copytree(local_dir, tmp)
                verify_bundle(tmp, expected_key=key)  # what was copied is what was checked
                _install(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        ref = self._existing_ref(key)
        assert ref is not None
        return ref

    def list_keys(self) -> list[str]:
        if not self._kernels.is_dir():
            return []
        with _os_errors(f"cannot list {self._kernels}"):
            return sorted(
                p.name for p in self._kernels.iterdir() if is_key(p.name) and (p / MANIFEST).is_file()
            )

    def delete_bundle(self, key: str) -> bool:
        d = self._dir(key)
        if not d.exists():
            return False
        existed = (d / MANIFEST).is_file()
        gone = self._kernels / f".{key}.del-{uuid.uuid4().hex[:12]}"
        with _os_errors(f"cannot delete {d}"):
            d.rename(gone)
            shutil.rmtree(gone)
        return existed

    def read_manifest_bytes(self, key: str) -> bytes:
        path = self._dir(key) / MANIFEST
        try:
            with _os_errors(f"cannot read {path}"):
                return path.read_bytes()
        except FileNotFoundError:
            raise BundleNotFound(f"no bundle {key} in {self.uri}") from None

    def read_signature_bytes(self, key: str) -> bytes | None:
        path = self._dir(key) / SIGNATURE
        try:
            with _os_errors(f"cannot read {path}"), open(path, "rb") as f:
                data = f.read(MAX_SIGNATURE_BYTES + 1)
        except FileNotFoundError:
            return None
        if len(data) > MAX_SIGNATURE_BYTES:
            raise ArtifactError(f"{path}: larger than {MAX_SIGNATURE_BYTES} bytes")
        return data

    def _download(self, key: str, name: str, dest: Path, max_bytes: int) -> None:
        src = self._dir(key) / name
        try:
            with _os_errors(f"cannot copy {src}"), open(src, "rb") as fin, open(dest, "wb") as fout:
                copy_capped(fin, fout, max_bytes, str(src))
        except FileNotFoundError:
            raise ArtifactError(f"{src}: listed in the manifest but missing from the store") from None
