"""Bundle signatures (esper.signing) and `esper verify`: what is refused, and why, before any load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from esper import artifact, signing
from esper.artifact import ArtifactError, verify_bundle
from esper.cli.main import app
from esper.signing import SignatureError, TrustedKeys
from tests.support.s3 import make_fake_bundle

runner = CliRunner()


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    """A fresh key pair on disk: (private key, public key file)."""
    private, public = signing.generate_key_pair(tmp_path / "keys")
    return signing.load_private_key(private), public


@pytest.fixture
def bundle(tmp_path: Path, keys: tuple[Ed25519PrivateKey, Path]) -> Path:
    d = tmp_path / "bundle"
    make_fake_bundle(d, signed=False)
    signing.sign_bundle(d, keys[0])
    return d


def verify(bundle: Path, *public: Path) -> int:
    return runner.invoke(app, ["verify", str(bundle), *(a for p in public for a in ("--public-key", str(p)))])


def test_signed_bundle_verifies_with_its_public_key(
    bundle: Path, keys: tuple[Ed25519PrivateKey, Path]
) -> None:
    trusted = TrustedKeys.from_paths([keys[1]])
    manifest = verify_bundle(bundle, trusted=trusted)
    assert manifest.key == json.loads((bundle / artifact.MANIFEST).read_bytes())["key"]
    doc = json.loads((bundle / artifact.SIGNATURE).read_bytes())
    assert doc["keyId"] == signing.key_id(keys[0].public_key()) and doc["algorithm"] == "ed25519"
    result = verify(bundle, keys[1])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output


def test_rotation_trusts_several_keys(
    tmp_path: Path, bundle: Path, keys: tuple[Ed25519PrivateKey, Path]
) -> None:
    _, new_public = signing.generate_key_pair(tmp_path / "new")
    both = TrustedKeys.from_paths([new_public, keys[1]])
    assert len(both) == 2
    assert verify_bundle(bundle, trusted=both)  # signed by the old key, still trusted
    only_new = TrustedKeys.from_paths([new_public])
    with pytest.raises(SignatureError, match="not trusted"):
        verify_bundle(bundle, trusted=only_new)
    # A directory of *.pub files is a key set too.
    keydir = tmp_path / "trusted"
    keydir.mkdir()
    for i, p in enumerate((new_public, keys[1])):
        (keydir / f"k{i}.pub").write_bytes(p.read_bytes())
    assert verify(bundle, keydir).exit_code == 0


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda d: _flip(d / artifact.FORWARD), "sha256 is"),
        (lambda d: _edit_manifest(d), "signature does not match manifest.json"),
        (lambda d: (d / artifact.SIGNATURE).unlink(), "unsigned"),
        (lambda d: signing.sign_bundle(d, Ed25519PrivateKey.generate()), "not trusted"),
        (lambda d: _corrupt_signature(d), "signature does not match"),
        (lambda d: (d / artifact.SIGNATURE).write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "extra.bin").write_bytes(b"x"), "not listed in the manifest"),
    ],
    ids=[
        "flipped-byte",
        "edited-manifest",
        "missing-signature",
        "foreign-key",
        "wrong-signature",
        "garbled-signature",
        "extra-file",
    ],
)
def test_esper_verify_refuses_with_the_reason(
    bundle: Path, keys: tuple[Ed25519PrivateKey, Path], tamper, reason: str
) -> None:
    tamper(bundle)
    result = verify(bundle, keys[1])
    assert result.exit_code == 1
    assert "NOT VERIFIED" in result.output and reason in result.output
    with pytest.raises(ArtifactError, match=reason):
        verify_bundle(bundle, trusted=TrustedKeys.from_paths([keys[1]]))


def test_verify_without_any_trusted_key_refuses(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(signing.KEY_DIR_ENV, str(tmp_path / "nowhere"))
    monkeypatch.delenv(signing.TRUSTED_KEYS_ENV, raising=False)
    result = runner.invoke(app, ["verify", str(bundle)])
    assert result.exit_code == 1 and "no trusted public keys configured" in result.output


def test_verify_with_an_unreadable_key_is_a_usage_error(bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    result = verify(bundle, bad)
    assert result.exit_code == 2 and "not a PEM public key" in result.output


def test_trusted_keys_from_env_follow_rotation(tmp_path: Path, keys: tuple[Ed25519PrivateKey, Path]) -> None:
    keydir = tmp_path / "env-keys"
    keydir.mkdir()
    env = {signing.TRUSTED_KEYS_ENV: str(keydir), signing.KEY_DIR_ENV: str(tmp_path / "none")}
    assert len(TrustedKeys.from_env(env)) == 0
    (keydir / "a.pub").write_bytes(keys[1].read_bytes())
    os.utime(keydir, ns=(1, 2))  # a new mtime even within the same clock tick
    assert TrustedKeys.from_env(env).key_ids == [signing.key_id(keys[0].public_key())]
    as_json = {**env, signing.TRUSTED_KEYS_ENV: json.dumps([str(keys[1])])}
    assert len(TrustedKeys.from_env(as_json)) == 1


def test_local_key_pair_is_created_once(tmp_path: Path) -> None:
    env = {signing.KEY_DIR_ENV: str(tmp_path / "local")}
    private, public = signing.ensure_local_keys(env)
    assert private.stat().st_mode & 0o777 == 0o600
    first = private.read_bytes()
    assert signing.ensure_local_keys(env) == (private, public) and private.read_bytes() == first
    key = signing.signing_key_from(local=True, env=env)
    assert signing.key_id(key.public_key()) == signing.key_id(signing.load_public_key(public))
    with pytest.raises(FileExistsError):
        signing.generate_key_pair(tmp_path / "local")


def test_shared_store_needs_a_configured_signing_key() -> None:
    with pytest.raises(signing.KeyFileError, match="no signing key"):
        signing.signing_key_from(local=False, env={})


def test_keygen_writes_a_pair_that_signs_and_verifies(tmp_path: Path) -> None:
    result = runner.invoke(app, ["keygen", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    private = signing.load_private_key(tmp_path / "k" / signing.PRIVATE_NAME)
    public = signing.load_public_key(tmp_path / "k" / signing.PUBLIC_NAME)
    assert signing.key_id(private.public_key()) == signing.key_id(public)
    again = runner.invoke(app, ["keygen", str(tmp_path / "k")])
    assert again.exit_code == 2 and "refusing to overwrite" in again.output


@pytest.mark.parametrize("value", ["a" * 64 + "\n", "A" * 64, "a" * 63, "a" * 65])
def test_keys_and_names_must_match_fully(value: str) -> None:
    """A trailing newline must not pass as a key (keys become paths and S3 object names)."""
    assert not artifact.is_key(value)


@pytest.mark.parametrize("name", ["forward.pt2\n", "../x", ".hidden", "a/b", ""])
def test_file_names_must_be_plain(name: str) -> None:
    assert not artifact.is_plain_name(name)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(d: Path) -> None:
    """Change a recorded hash to match a swapped file: consistent, but no longer what was signed."""
    doc = json.loads((d / artifact.MANIFEST).read_bytes())
    (d / artifact.FORWARD).write_bytes(b"planted")
    doc["files"][artifact.FORWARD] = {"sha256": artifact.sha256_bytes(b"planted"), "size": 7}
    (d / artifact.MANIFEST).write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n")


def _corrupt_signature(d: Path) -> None:
    doc = json.loads((d / artifact.SIGNATURE).read_bytes())
    other = Ed25519PrivateKey.generate().sign(b"something else")
    import base64

    doc["signature"] = base64.b64encode(other).decode()
    (d / artifact.SIGNATURE).write_text(json.dumps(doc))


def test_store_fetch_checks_the_signature_and_caps_each_file(
    tmp_path: Path, bundle: Path, keys: tuple[Ed25519PrivateKey, Path]
) -> None:
    """A file swapped in the store for a larger one is cut off at the recorded size, never installed."""
    from esper.storage import open_store

    key = json.loads((bundle / artifact.MANIFEST).read_bytes())["key"]
    store = open_store(str(tmp_path / "store"))
    store.put_bundle(key, bundle)
    trusted = TrustedKeys.from_paths([keys[1]])
    assert (store.fetch_bundle(key, tmp_path / "ok", trusted=trusted) / artifact.SIGNATURE).is_file()
    stored = tmp_path / "store" / "kernels" / key / artifact.FORWARD
    stored.write_bytes(b"\0" * (stored.stat().st_size + 1))
    with pytest.raises(ArtifactError, match="larger than the 4096 bytes the manifest records"):
        store.fetch_bundle(key, tmp_path / "swapped", trusted=trusted)
    assert not (tmp_path / "swapped").exists()
    (tmp_path / "store" / "kernels" / key / artifact.SIGNATURE).unlink()
    with pytest.raises(SignatureError, match="unsigned"):
        store.fetch_bundle(key, tmp_path / "unsigned", trusted=trusted)
