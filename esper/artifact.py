"""The kernel bundle format: the kernel key, the manifest, and writing and verifying bundles.

The one module both the compiler (writer) and the runtime (reader) use, so the two cannot drift apart.

A bundle is a flat directory named by its key (format v2)::

    forward.pt2          AOTInductor package: (inputs..., params) -> outputs (inference)
    train_forward.pt2    AOTInductor package: (inputs..., params) -> (outputs..., activations...)
    train_backward.pt2   AOTInductor package: (saved..., grad_outputs..., params) -> grads
    params.safetensors   initial parameters
    manifest.json        written last; its sha256 is the bundle's identity

`saved` is the manifest's list of what the training backward takes, in order: an input, an output or
an activation of the training forward (which returns its activations after its outputs, in order).
A format v1 bundle has `backward.pt2` instead of the two training packages: (inputs...,
grad_outputs..., params) -> grads, recomputing the forward; it still loads.

Security: the ``.pt2`` packages are native code (loading one dlopens a shared library) and are
trusted-only. Before anything in a bundle is loaded, `verify_bundle` must pass with `trusted` keys
(the compile Job's ed25519 signature over manifest.json, ``manifest.sig``: see esper.signing) and,
where one is recorded, the manifest's sha256 (the Kernel's status). Nothing here ever unpickles:
tensors travel as safetensors and everything else as JSON. No torch import: the operator uses this module too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal, Protocol

from pydantic import Field, ValidationError, field_validator

from esper.contracts.common import CompileOptions, Model, Toolchain, ValidationReport, now_rfc3339
from esper.targets import Target

FORMAT_V1: Final = "esper.dev/kernel-bundle/v1"
FORMAT: Final = "esper.dev/kernel-bundle/v2"
FORMATS: tuple[str, ...] = (FORMAT_V1, FORMAT)
FORWARD = "forward.pt2"
TRAIN_FORWARD = "train_forward.pt2"
TRAIN_BACKWARD = "train_backward.pt2"
BACKWARD = "backward.pt2"  # format v1 only: the backward that recomputes the forward
PARAMS = "params.safetensors"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # the compile Job's signature over manifest.json (format: esper.signing)
DATA_FILES: tuple[str, ...] = (FORWARD, TRAIN_FORWARD, TRAIN_BACKWARD, PARAMS)
DATA_FILES_V1: tuple[str, ...] = (FORWARD, BACKWARD, PARAMS)
FILE_NAMES: tuple[str, ...] = (*DATA_FILES, MANIFEST, SIGNATURE)
META_FILES: tuple[str, ...] = (MANIFEST, SIGNATURE)
"""Files a manifest never lists: itself and the signature over it."""

KEY_PATTERN = r"^[0-9a-f]{64}$"
_KEY_RE = re.compile(KEY_PATTERN)
# A plain file name: no separators, no "..", no hidden files (temp files are hidden).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_SIGNATURE_BYTES = 4096
_CHUNK = 1024 * 1024


class ArtifactError(Exception):
    """A bundle's content is wrong (missing, corrupt, unexpected): not transient, do not retry."""


def is_key(value: str) -> bool:
    """Whether `value` looks like a kernel key (64 lowercase hex digits)."""
    return isinstance(value, str) and _KEY_RE.fullmatch(value) is not None


def check_key(value: str) -> str:
    """Return `value` if it is a kernel key; a ValueError otherwise (keys become paths and S3 keys)."""
    if not is_key(value):
        raise ValueError(f"invalid kernel key {value!r}: expected 64 lowercase hex digits")
    return value


def is_plain_name(name: str) -> bool:
    """Whether `name` is safe as a bundle file name: no path separators, no '..', not hidden."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None and ".." not in name


def canonical_json(value: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8. Used for key hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def kernel_key(ir_digest: str, target: Target | str, options: CompileOptions, toolchain: Toolchain) -> str:
    """The content-derived kernel key: sha256 of the canonical JSON of what determines the kernel.

    The toolchain part is the torch version and the capability only; the Python version is
    informational. The capability must be the target's (a mismatch is a caller bug).
    """
    t = Target.parse(target)
    if toolchain.capability != t.capability:
        raise ValueError(
            f"toolchain capability {toolchain.capability!r} does not match target {t.name} "
            f"(expected {t.capability!r})"
        )
    doc = {
        "irDigest": ir_digest,
        "target": t.name,
        "options": options.model_dump(mode="json"),
        "toolchain": {"torch": toolchain.torch, "capability": toolchain.capability},
    }
    return hashlib.sha256(canonical_json(doc)).hexdigest()


class FileEntry(Model):
    """One data file of a bundle."""

    sha256: str = Field(pattern=KEY_PATTERN, description="sha256 of the file's bytes.")
    size: int = Field(ge=0, description="Size in bytes.")


class IOSpec(Model):
    """A kernel input or output: name and shape ('batch' for the symbolic batch dimension)."""

    name: str = Field(max_length=64)
    shape: list[int | str] = Field(max_length=8)
    dtype: str = Field(default="float32", max_length=16)


class ParamSpec(Model):
    """One parameter, in the order the compiled packages take them."""

    name: str = Field(max_length=256)
    shape: list[int] = Field(max_length=8)
    dtype: str = Field(max_length=16)


class SavedSpec(Model):
    """One tensor the training forward hands to the training backward (format v2).

    `kind` says where it comes from: the call's input `index`, its output `index`, or the training
    forward's extra output `index` (an activation). Shapes are symbolic in `batch`, e.g. `["batch", 16]`
    or `["16*batch", 64]`.
    """

    kind: Literal["input", "output", "activation"]
    index: int = Field(ge=0)
    shape: list[int | str] = Field(max_length=8)
    dtype: str = Field(default="float32", max_length=16)


class Manifest(Model):
    """manifest.json: what a bundle is, what built it, and the hash of every data file."""

    format: Literal["esper.dev/kernel-bundle/v1", "esper.dev/kernel-bundle/v2"] = FORMAT
    key: str = Field(pattern=KEY_PATTERN)
    irDigest: str = Field(pattern=KEY_PATTERN)
    target: str
    options: CompileOptions = Field(default_factory=CompileOptions)
    toolchain: Toolchain
    graph: dict[str, Any] = Field(description="The canonical expanded IR.")
    inputs: list[IOSpec] = Field(default_factory=list)
    outputs: list[IOSpec] = Field(default_factory=list)
    params: list[ParamSpec] = Field(default_factory=list)
    saved: list[SavedSpec] = Field(default_factory=list, max_length=4096)
    files: dict[str, FileEntry] = Field(default_factory=dict)
    report: ValidationReport | None = None
    createdAt: str = Field(default_factory=now_rfc3339)
    blueprint: str | None = Field(
        default=None, max_length=253, description="The Blueprint that first asked for it (not in the key)."
    )
    mixesPositions: bool | None = Field(
        default=None, description="Some output position depends on another input position."
    )
    causal: bool | None = Field(
        default=None, description="No output position depends on a later one (None: not recorded)."
    )

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        return Target.parse(v).name

    @field_validator("files")
    @classmethod
    def _names(cls, v: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in v:
            if not is_plain_name(name) or name in META_FILES:
                raise ValueError(f"file name {name!r} is not a plain bundle file name")
        return v

    @property
    def data_files(self) -> tuple[str, ...]:
        """The data files a bundle of this manifest's format must hold."""
        return DATA_FILES_V1 if self.format == FORMAT_V1 else DATA_FILES

    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def expected_key(self) -> str:
        """The key this manifest's inputs derive (to check `key` against)."""
        return kernel_key(self.irDigest, self.target, self.options, self.toolchain)

    def to_bytes(self) -> bytes:
        """The serialized form written to manifest.json (deterministic for a given manifest)."""
        return (json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2) + "\n").encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: Path | str) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _data_files(bundle_dir: Path) -> list[Path]:
    out = []
    for p in sorted(bundle_dir.iterdir()):
        if p.name in META_FILES:
            continue
        if p.is_symlink() or not p.is_file():
            raise ArtifactError(f"{bundle_dir}: {p.name!r} is not a regular file (bundles are flat)")
        if not is_plain_name(p.name):
            raise ArtifactError(f"{bundle_dir}: {p.name!r} is not a plain bundle file name")
        out.append(p)
    return out


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that a reader sees the old or the new file, never half of one:
    a temp file in the same directory, fsync, then os.replace. `mode` because mkstemp makes 0600 and
    readers (the trainer beside the sidecar) may run as another user."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def bundle_size(manifest: Manifest, manifest_bytes: bytes) -> int:
    """A bundle's size in bytes, everywhere it is reported (ArtifactRef, the compile result, `esper
    kernels`): its data files as the manifest records them, plus manifest.json itself."""
    return sum(f.size for f in manifest.files.values()) + len(manifest_bytes)


def write_manifest(bundle_dir: Path | str, manifest: Manifest) -> tuple[str, int]:
    """Hash every data file in `bundle_dir`, record them in the manifest, write manifest.json atomically.

    `manifest.files` is replaced by what is on disk. Returns (sha256 of manifest.json, total bundle
    size in bytes including manifest.json).
    """
    d = Path(bundle_dir)
    files = {}
    for p in _data_files(d):
        sha, size = hash_file(p)
        files[p.name] = FileEntry(sha256=sha, size=size)
    written = manifest.model_copy(update={"files": files})
    data = written.to_bytes()
    Manifest.model_validate_json(data)  # never write what verify_bundle would refuse
    atomic_write(d / MANIFEST, data)
    return sha256_bytes(data), bundle_size(written, data)


def parse_manifest(data: bytes, source: str = MANIFEST) -> Manifest:
    """Parse manifest.json bytes; ArtifactError if not JSON, of an unknown format, or invalid."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{source}: not a JSON object")
    if doc.get("format") not in FORMATS:
        raise ArtifactError(
            f"{source}: unknown format {doc.get('format')!r} (expected one of {', '.join(FORMATS)})"
        )
    try:
        return Manifest.model_validate(doc)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()
        )
        raise ArtifactError(f"{source}: invalid manifest: {problems}") from None


def read_manifest_bytes(bundle_dir: Path | str) -> bytes:
    """The raw bytes of a bundle's manifest.json (size-limited); ArtifactError if absent."""
    path = Path(bundle_dir) / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise ArtifactError(f"{path}: manifest.json is missing")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path}: manifest.json is larger than {MAX_MANIFEST_BYTES} bytes")
    return path.read_bytes()


def read_manifest(bundle_dir: Path | str) -> Manifest:
    """Parse a bundle's manifest without checking its files (use `verify_bundle` before loading)."""
    return parse_manifest(read_manifest_bytes(bundle_dir), str(Path(bundle_dir) / MANIFEST))


class Verifier(Protocol):
    """What checks a manifest's signature (esper.signing.TrustedKeys); a Protocol so this module
    needs no crypto import."""

    def verify(self, manifest_bytes: bytes, signature_bytes: bytes | None, source: str = "") -> str: ...


def read_signature_bytes(bundle_dir: Path | str) -> bytes | None:
    """The raw manifest.sig of a bundle (size-limited), or None if the bundle is unsigned."""
    path = Path(bundle_dir) / SIGNATURE
    if path.is_symlink() or not path.is_file():
        return None
    if path.stat().st_size > MAX_SIGNATURE_BYTES:
        raise ArtifactError(f"{path}: larger than {MAX_SIGNATURE_BYTES} bytes")
    return path.read_bytes()


def verify_bundle(
    bundle_dir: Path | str,
    expected_sha256: str | None = None,
    *,
    expected_key: str | None = None,
    trusted: Verifier | None = None,
) -> Manifest:
    """Check a bundle completely and return its manifest; ArtifactError naming the file at fault.

    In order: manifest present; its signature holds for one of the `trusted` keys (if given: before
    the manifest is even parsed); its sha256 equals `expected_sha256` (if given); it parses with a
    known format; its key equals `expected_key` (if given); every listed file exists with the recorded
    size and sha256; no unlisted files. File names are plain (checked when parsing).
    """
    d = Path(bundle_dir)
    if not d.is_dir():
        raise ArtifactError(f"{d}: bundle directory does not exist")
    data = read_manifest_bytes(d)
    if trusted is not None:
        trusted.verify(data, read_signature_bytes(d), str(d))
    sha = sha256_bytes(data)
    if expected_sha256 is not None and sha != expected_sha256:
        raise ArtifactError(f"{d / MANIFEST}: sha256 is {sha}, expected {expected_sha256}")
    manifest = parse_manifest(data, str(d / MANIFEST))
    if expected_key is not None and manifest.key != expected_key:
        raise ArtifactError(f"{d / MANIFEST}: key is {manifest.key}, expected {expected_key}")
    for name, entry in manifest.files.items():
        path = d / name
        if path.is_symlink() or not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry.size:  # before reading: a huge planted file is not hashed
            raise ArtifactError(f"{path}: size is {path.stat().st_size} bytes, manifest says {entry.size}")
        actual_sha, size = hash_file(path)
        if size != entry.size:
            raise ArtifactError(f"{path}: size is {size} bytes, manifest says {entry.size}")
        if actual_sha != entry.sha256:
            raise ArtifactError(f"{path}: sha256 is {actual_sha}, manifest says {entry.sha256}")
    for p in d.iterdir():
        if p.name not in META_FILES and p.name not in manifest.files:
            raise ArtifactError(f"{p}: not listed in the manifest")
        if p.name == SIGNATURE and (p.is_symlink() or not p.is_file()):
            raise ArtifactError(f"{p}: not a regular file")
    return manifest


def copy_capped(fin: BinaryIO, fout: BinaryIO, max_bytes: int, source: str) -> tuple[str, int]:
    """Copy at most `max_bytes`; ArtifactError as soon as the source holds more. Returns the copy's
    (sha256, size), hashed while copying: one read of the source."""
    left = max_bytes
    h = hashlib.sha256()
    while chunk := fin.read(min(_CHUNK, left + 1)):
        if len(chunk) > left:
            raise ArtifactError(f"{source}: larger than the {max_bytes} bytes the manifest records")
        fout.write(chunk)
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest(), max_bytes - left


def private_copy(
    bundle_dir: Path | str, dest: Path | str, expected_sha256: str | None = None, *, trusted: Verifier
) -> Manifest:
    """Copy a bundle that someone else may change (the sidecar's shared volume) into `dest`, a
    directory only this process writes, and verify the copy; returns its manifest.

    The signature (and `expected_sha256`) are checked on the manifest bytes before anything else is
    read; only the files it lists are copied, each stopped at its recorded size. Loading from `dest`
    afterwards cannot see a file swapped in the source between the check and the load.
    """
    src, out = Path(bundle_dir), Path(dest)
    if not src.is_dir():
        raise ArtifactError(f"{src}: bundle directory does not exist")
    data = read_manifest_bytes(src)
    signature = read_signature_bytes(src)
    trusted.verify(data, signature, str(src))
    if expected_sha256 is not None and (sha := sha256_bytes(data)) != expected_sha256:
        raise ArtifactError(f"{src / MANIFEST}: sha256 is {sha}, expected {expected_sha256}")
    manifest = parse_manifest(data, str(src / MANIFEST))
    out.mkdir(mode=0o700)
    for name, entry in manifest.files.items():
        path = src / name
        if path.is_symlink() or not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        with open(path, "rb") as fin, open(out / name, "wb") as fout:
            sha, size = copy_capped(fin, fout, entry.size, str(path))
        # The copy is checked as written (this process alone writes `out`): size, then sha256.
        if size != entry.size:
            raise ArtifactError(f"{path}: size is {size} bytes, manifest says {entry.size}")
        if sha != entry.sha256:
            raise ArtifactError(f"{path}: sha256 is {sha}, manifest says {entry.sha256}")
    (out / MANIFEST).write_bytes(data)
    if signature is not None:
        (out / SIGNATURE).write_bytes(signature)
    return manifest
