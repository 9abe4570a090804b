"""Bundle signatures: the one module for the signature format, signing keys and trusted keys.

A kernel bundle is native code that training pods dlopen, so a sha256 recorded somewhere is not
enough: whoever can write the bucket can write a manifest and its hashes too. The compile Job signs
the exact bytes of ``manifest.json`` with an ed25519 private key only compile Jobs can read; the
runtime (``load_kernel``, the sidecar, ``esper verify``) checks that signature against its trusted
public keys before any other byte of the bundle is used. The manifest lists every data file's sha256,
so a good signature on the manifest covers the whole bundle.

``manifest.sig`` (beside manifest.json; the name is ``esper.artifact.SIGNATURE``) is one JSON object::

    {"format": "esper.dev/kernel-signature/v1", "algorithm": "ed25519",
     "keyId": "<sha256 hex of the raw 32-byte public key>", "signature": "<base64, 64 bytes>"}

Keys are PEM files: PKCS#8 for the private key, SubjectPublicKeyInfo for public keys. Several trusted
public keys may be configured at once (rotation: a new key signs, the old one still verifies). The
key id only picks the key; the signature is checked against that key and nothing else.

Where keys come from, in order:
- signing (the compile Job): ``--signing-key FILE`` or ``$ESPER_SIGNING_KEY``; local use falls back to
  the local key pair (below).
- verifying (runtime): an explicit list, else ``$ESPER_TRUSTED_KEYS`` (JSON list or ``:``-separated
  files or directories of ``*.pub``), else the local key pair's public key.
- the local key pair: ``$ESPER_KEY_DIR``, else ``$XDG_CONFIG_HOME/esper/keys``, else
  ``~/.config/esper/keys``; created once (``signing.key``, mode 0600, and ``signing.pub``) by
  ``esper compile`` and ``esper demo`` so local use needs no set-up.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from esper.artifact import ArtifactError

SIGNATURE_FORMAT = "esper.dev/kernel-signature/v1"
ALGORITHM = "ed25519"
MAX_SIGNATURE_BYTES = 4096
MAX_KEY_BYTES = 16 * 1024
SIGNING_KEY_ENV = "ESPER_SIGNING_KEY"
TRUSTED_KEYS_ENV = "ESPER_TRUSTED_KEYS"
KEY_DIR_ENV = "ESPER_KEY_DIR"
PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"


class SignatureError(ArtifactError):
    """A bundle is unsigned, its signature is malformed, or no trusted key verifies it."""


class KeyFileError(ValueError):
    """A key file is missing, unreadable or not an ed25519 key in PEM."""


def key_id(public: Ed25519PublicKey) -> str:
    """sha256 hex of the raw public key: names a key in signatures and messages."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _read_key_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_BYTES + 1)
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror or e}") from None
    if len(data) > MAX_KEY_BYTES:
        raise KeyFileError(f"key file {path} is larger than {MAX_KEY_BYTES} bytes")
    return data


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """An ed25519 private key from a PKCS#8 PEM file (unencrypted: it lives in a Secret)."""
    p = Path(path)
    data = _read_key_file(p)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{p}: not a PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{p}: not an ed25519 private key")
    return key


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """An ed25519 public key from a SubjectPublicKeyInfo PEM file."""
    p = Path(path)
    data = _read_key_file(p)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{p}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{p}: not an ed25519 public key")
    return key


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_key_pair(directory: Path | str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new `signing.key` (0600) and `signing.pub` into `directory`; (private, public) paths.

    Refuses to overwrite an existing private key unless asked: a lost key makes every bundle it
    signed untrusted where only its public key was configured.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    private, public = d / PRIVATE_NAME, d / PUBLIC_NAME
    if private.exists() and not overwrite:
        raise FileExistsError(f"{private} exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(private, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem(key))
    os.chmod(private, 0o600)
    public.write_bytes(public_pem(key.public_key()))
    return private, public


def local_key_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the local key pair lives: $ESPER_KEY_DIR, $XDG_CONFIG_HOME/esper/keys, ~/.config/esper/keys."""
    e = os.environ if env is None else env
    if e.get(KEY_DIR_ENV):
        return Path(e[KEY_DIR_ENV]).expanduser()
    base = Path(e["XDG_CONFIG_HOME"]) if e.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "esper" / "keys"


def ensure_local_keys(env: Mapping[str, str] | None = None) -> tuple[Path, Path]:
    """The local key pair (private, public), created on first use."""
    d = local_key_dir(env)
    private, public = d / PRIVATE_NAME, d / PUBLIC_NAME
    if not private.exists():
        with contextlib.suppress(FileExistsError):  # another process created it meanwhile
            generate_key_pair(d)
    if not public.exists():
        public.write_bytes(public_pem(load_private_key(private).public_key()))
    return private, public


# --- signing ------------------------------------------------------------------------------------


def sign(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """The manifest.sig bytes for `manifest_bytes`."""
    doc = {
        "format": SIGNATURE_FORMAT,
        "algorithm": ALGORITHM,
        "keyId": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(manifest_bytes)).decode(),
    }
    return (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode()


def sign_bundle(bundle_dir: Path | str, key: Ed25519PrivateKey) -> Path:
    """Sign the bundle's manifest.json; writes manifest.sig atomically and returns its path."""
    from esper.artifact import SIGNATURE, atomic_write, read_manifest_bytes

    d = Path(bundle_dir)
    data = read_manifest_bytes(d)
    atomic_write(d / SIGNATURE, sign(data, key))
    return d / SIGNATURE


def signing_key_from(
    path: str | None = None, *, local: bool, env: Mapping[str, str] | None = None
) -> Ed25519PrivateKey:
    """The compile Job's signing key: `path`, else $ESPER_SIGNING_KEY, else (local use only) the local
    key pair, created if needed. KeyFileError when none is configured for a shared store."""
    e = os.environ if env is None else env
    chosen = path or e.get(SIGNING_KEY_ENV)
    if chosen:
        return load_private_key(chosen)
    if local:
        return load_private_key(ensure_local_keys(e)[0])
    raise KeyFileError(
        f"no signing key: give --signing-key FILE or set ${SIGNING_KEY_ENV} (bundles in a shared store "
        "must be signed by a key only compile Jobs hold)"
    )


# --- verifying ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    key_id: str
    signature: bytes


def parse_signature(data: bytes, source: str = "manifest.sig") -> Signature:
    """Parse manifest.sig bytes; SignatureError saying what is wrong."""
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{source}: larger than {MAX_SIGNATURE_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SignatureError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise SignatureError(f"{source}: not a JSON object")
    if doc.get("format") != SIGNATURE_FORMAT:
        raise SignatureError(
            f"{source}: unknown format {doc.get('format')!r} (expected {SIGNATURE_FORMAT!r})"
        )
    if doc.get("algorithm") != ALGORITHM:
        raise SignatureError(f"{source}: algorithm {doc.get('algorithm')!r} is not {ALGORITHM}")
    kid, sig = doc.get("keyId"), doc.get("signature")
    if not isinstance(kid, str) or len(kid) != 64:
        raise SignatureError(f"{source}: keyId is not a key id")
    try:
        raw = base64.b64decode(sig if isinstance(sig, str) else "", validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{source}: signature is not base64") from None
    if len(raw) != 64:
        raise SignatureError(f"{source}: signature is {len(raw)} bytes, an ed25519 signature is 64")
    return Signature(kid, raw)


class TrustedKeys:
    """The public keys a runtime accepts bundle signatures from (several: key rotation)."""

    def __init__(self, keys: Iterable[Ed25519PublicKey], sources: Sequence[str] = ()) -> None:
        self._keys = {key_id(k): k for k in keys}
        self.sources = tuple(sources)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def public_keys(self) -> list[Ed25519PublicKey]:
        return [self._keys[k] for k in self.key_ids]

    @classmethod
    def from_paths(cls, paths: Iterable[str | os.PathLike[str]]) -> TrustedKeys:
        """Public key files, or directories whose `*.pub` files are read; KeyFileError if none is found."""
        keys, sources = [], []
        for raw in paths:
            p = Path(raw).expanduser()
            files = sorted(p.glob("*.pub")) if p.is_dir() else [p]
            for f in files:
                keys.append(load_public_key(f))
                sources.append(str(f))
        return cls(keys, sources)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrustedKeys:
        """$ESPER_TRUSTED_KEYS (JSON list or ':'-separated paths), else the local public key if one
        exists; empty (which trusts nothing) otherwise."""
        e = os.environ if env is None else env
        return _from_env_cached(e.get(TRUSTED_KEYS_ENV, ""), str(local_key_dir(e) / PUBLIC_NAME))

    def verify(self, manifest_bytes: bytes, signature_bytes: bytes | None, source: str = "") -> str:
        """The id of the trusted key whose signature over `manifest_bytes` holds; SignatureError otherwise."""
        where = source or "bundle"
        if signature_bytes is None:
            raise SignatureError(f"{where}: unsigned (no manifest.sig): refusing a bundle Esper did not sign")
        if not self._keys:
            raise SignatureError(
                f"{where}: no trusted public keys configured (set ${TRUSTED_KEYS_ENV} or pass --public-key)"
            )
        sig = parse_signature(signature_bytes, f"{where}/manifest.sig")
        key = self._keys.get(sig.key_id)
        if key is None:
            raise SignatureError(
                f"{where}: signed by key {sig.key_id[:16]}, which is not trusted "
                f"(trusted: {', '.join(k[:16] for k in self.key_ids)})"
            )
        try:
            key.verify(sig.signature, manifest_bytes)
        except InvalidSignature:
            raise SignatureError(
                f"{where}: signature does not match manifest.json (key {sig.key_id[:16]}): "
                "the manifest was changed after signing"
            ) from None
        return sig.key_id


def parse_key_paths(value: str) -> list[str]:
    """A path list from the environment: a JSON list, or ':'-separated."""
    value = value.strip()
    if not value:
        return []
    if value.startswith("["):
        items = json.loads(value)
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise KeyFileError(f"${TRUSTED_KEYS_ENV}: expected a JSON list of paths")
        return [i for i in items if i]
    return [p for p in value.split(":") if p]


_CACHE: dict[tuple[object, ...], TrustedKeys] = {}


def _stamp(path: str) -> tuple[str, int]:
    try:
        return path, os.stat(path).st_mtime_ns
    except OSError:
        return path, -1


def _from_env_cached(value: str, local_public: str) -> TrustedKeys:
    """Keys parsed once per process and re-read when a key file or directory changes (rotation
    without a restart); a stat per path is all a load costs."""
    paths = parse_key_paths(value)
    stamp = (value, local_public, *(_stamp(str(Path(p).expanduser())) for p in paths or [local_public]))
    cached = _CACHE.get(stamp)
    if cached is not None:
        return cached
    if paths:
        keys = TrustedKeys.from_paths(paths)
    elif Path(local_public).is_file():
        keys = TrustedKeys.from_paths([local_public])
    else:
        keys = TrustedKeys([])
    if len(_CACHE) > 16:
        _CACHE.clear()
    _CACHE[stamp] = keys
    return keys


def resolve_trusted(
    keys: TrustedKeys | Sequence[str | os.PathLike[str]] | None, env: Mapping[str, str] | None = None
) -> TrustedKeys:
    """Trusted keys given explicitly (object or paths), else from the environment."""
    if isinstance(keys, TrustedKeys):
        return keys
    if keys:
        return TrustedKeys.from_paths(keys)
    return TrustedKeys.from_env(env)
