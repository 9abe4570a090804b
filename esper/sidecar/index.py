"""The shared kernel volume: its layout, and the index the trainer watches.

Layout (written only by the Kasmina sync sidecar, read by the trainer)::

    <dir>/index.json            {"version", "updatedAt", "kernels": [IndexEntry...]}
    <dir>/kernels/<name>/       one verified bundle per Kernel (see esper.artifact)

Ordering makes the index trustworthy without locks: a bundle directory is renamed into place whole
before the index names it, and an entry leaves the index before its directory is removed. The index is
replaced atomically (temp file + fsync + os.replace), so a reader sees the old or the new file, never
half of one. `version` only grows, so a trainer can tell "new" from "same" cheaply.

The trainer must still `verify_bundle(entry_dir, entry.sha256)` before loading: the packages are
native code and only the sha256 the Kernel's status recorded makes them trusted.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from esper.artifact import KEY_PATTERN, atomic_write
from esper.contracts.common import now_rfc3339

INDEX_FILE = "index.json"
KERNELS_SUBDIR = "kernels"
# A Kubernetes object name (DNS-1123 subdomain): safe as one directory name.
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class IndexCorrupt(ValueError):
    """index.json exists but is not a valid index (it is always replaced atomically: a bug or tampering)."""


class IndexEntry(BaseModel):
    """One installed, verified kernel bundle."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(description="The Kernel object's name (also its directory name).")
    namespace: str
    key: str = Field(pattern=KEY_PATTERN)
    sha256: str = Field(pattern=KEY_PATTERN, description="sha256 of manifest.json, from the Kernel's status.")
    target: str
    blueprint: str = ""
    path: str = Field(description="The bundle directory, relative to the kernel dir.")
    size: int = Field(ge=0)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not a Kubernetes object name")
        return v

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        p = Path(v)
        if p.is_absolute() or ".." in p.parts or not v:
            raise ValueError(f"path {v!r} must be relative and inside the kernel dir")
        return v

    def bundle_dir(self, kernel_dir: Path | str) -> Path:
        """The absolute bundle directory under `kernel_dir`."""
        return Path(kernel_dir) / self.path


class Index(BaseModel):
    """index.json."""

    model_config = ConfigDict(extra="ignore")

    version: int = Field(default=0, ge=0)
    updatedAt: str = ""
    kernels: list[IndexEntry] = Field(default_factory=list)

    def get(self, name: str) -> IndexEntry | None:
        """The entry of Kernel `name`, if installed."""
        return next((k for k in self.kernels if k.name == name), None)

    def by_name(self) -> dict[str, IndexEntry]:
        return {k.name: k for k in self.kernels}


def index_path(kernel_dir: Path | str) -> Path:
    return Path(kernel_dir) / INDEX_FILE


def bundle_path(kernel_dir: Path | str, name: str) -> Path:
    """Where Kernel `name`'s bundle lives; ValueError for a name that is not a safe directory name."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not a Kubernetes object name")
    return Path(kernel_dir) / KERNELS_SUBDIR / name


def parse_index(data: bytes, source: str = INDEX_FILE) -> Index:
    """Parse index.json bytes; IndexCorrupt naming the problem."""
    try:
        return Index.model_validate_json(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or '<root>'}: {x['msg']}" for x in e.errors())
        raise IndexCorrupt(f"{source}: not a valid kernel index: {problems}") from None


def read_index(kernel_dir: Path | str) -> Index:
    """The current index; an empty one (version 0) if none has been written yet."""
    path = index_path(kernel_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Index()
    return parse_index(data, str(path))


def write_index(kernel_dir: Path | str, kernels: list[IndexEntry], version: int) -> Index:
    """Atomically replace index.json with `kernels` (sorted by name) at `version`; returns it."""
    d = Path(kernel_dir)
    d.mkdir(parents=True, exist_ok=True)
    index = Index(version=version, updatedAt=now_rfc3339(), kernels=sorted(kernels, key=lambda k: k.name))
    data = (json.dumps(index.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()
    atomic_write(index_path(d), data)
    return index


class IndexWatcher:
    """For the trainer: `changed()` between steps costs one os.stat and parses only on change.

    The file's identity is (inode, mtime_ns, size): os.replace always brings a new inode, so even a
    rewrite within one timestamp tick with the same size is seen.
    """

    def __init__(self, kernel_dir: Path | str) -> None:
        self.kernel_dir = Path(kernel_dir)
        self.path = index_path(kernel_dir)
        self._seen: tuple[int, int, int] | bool | None = False  # False: never looked
        self.current = Index()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def changed(self) -> Index | None:
        """The new index if the file changed since the last call (the first call always returns it).

        A missing file reads as an empty index. A corrupt file raises IndexCorrupt, and the next call
        tries again (the watcher does not remember a signature it could not parse).
        """
        sig = self._signature()
        if sig == self._seen:
            return None
        index = Index()
        if sig is not None:
            try:
                with open(self.path, "rb") as f:  # fstat: the signature of exactly the bytes read
                    st = os.fstat(f.fileno())
                    data = f.read()
            except FileNotFoundError:
                sig = None
            else:
                sig = (st.st_ino, st.st_mtime_ns, st.st_size)
                index = parse_index(data, str(self.path))
        self._seen = sig
        self.current = index
        return index
