"""The kernel key and the bundle format: what verify_bundle must catch, each case by itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esper.artifact import (
    BACKWARD,
    DATA_FILES,
    FORMAT,
    FORMAT_V1,
    FORWARD,
    MANIFEST,
    PARAMS,
    TRAIN_BACKWARD,
    ArtifactError,
    Manifest,
    hash_file,
    kernel_key,
    read_manifest,
    sha256_bytes,
    verify_bundle,
    write_manifest,
)
from esper.contracts.common import CompileOptions, Toolchain, ValidationReport
from tests.support.s3 import make_fake_bundle

DIGEST = "a" * 64
TC = Toolchain(torch="2.13.0", capability="sm90", python="3.11.7")


def test_key_is_stable() -> None:
    # Pinned values: the operator and the compile Job must agree across releases, and a change
    # orphans every stored kernel, so it must be deliberate.
    key = kernel_key(DIGEST, "cuda-sm90", CompileOptions(), TC)
    assert key == "8c699a2087eb106e6879e25eae437d39506bbe20b7553ec5c45795b4ddf020e4"
    assert key == kernel_key(DIGEST, "cuda-sm90", CompileOptions(maxBatch=1024, initSeed=0), TC)
    cpu = Toolchain(torch="2.13.0", capability="cpu-avx2")
    doc = {
        "irDigest": DIGEST,
        "target": "cpu",
        "options": {
            "maxBatch": 1024,
            "initSeed": 0,
            "validateBatches": [1, 7, 32],
            "benchmarkBatches": [8, 32, 128],
        },
        "toolchain": {"torch": "2.13.0", "capability": "cpu-avx2"},
    }
    expected = sha256_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    assert kernel_key(DIGEST, "cpu", CompileOptions(), cpu) == expected


def test_key_ignores_python_version() -> None:
    other = TC.model_copy(update={"python": "3.12.1"})
    assert kernel_key(DIGEST, "cuda-sm90", CompileOptions(), TC) == kernel_key(
        DIGEST, "cuda-sm90", CompileOptions(), other
    )


@pytest.mark.parametrize(
    "change",
    [
        {"ir_digest": "b" * 64},
        {"target": "cuda-sm90a", "toolchain": TC.model_copy(update={"capability": "sm90a"})},
        {"target": "cpu", "toolchain": TC.model_copy(update={"capability": "cpu-avx2"})},
        {"options": CompileOptions(maxBatch=512)},
        {"options": CompileOptions(initSeed=1)},
        {"options": CompileOptions(validateBatches=[1, 7])},
        {"options": CompileOptions(benchmarkBatches=[8])},
        {"toolchain": TC.model_copy(update={"torch": "2.14.0"})},
    ],
)
def test_key_changes_with_each_component(change: dict) -> None:
    args = {"ir_digest": DIGEST, "target": "cuda-sm90", "options": CompileOptions(), "toolchain": TC}
    assert kernel_key(**args) != kernel_key(**{**args, **change})


def test_key_refuses_capability_mismatch() -> None:
    with pytest.raises(ValueError, match="does not match target"):
        kernel_key(DIGEST, "cpu", CompileOptions(), TC)


def test_manifest_round_trip(tmp_path: Path) -> None:
    key, sha = make_fake_bundle(tmp_path, signed=False)  # the size counts no signature
    m = verify_bundle(tmp_path, sha, expected_key=key)
    assert m.format == FORMAT and m.key == key == m.expected_key()
    assert set(m.files) == set(DATA_FILES)
    assert (m.files[FORWARD].sha256, m.files[FORWARD].size) == hash_file(tmp_path / FORWARD)
    assert read_manifest(tmp_path) == m
    assert Manifest.model_validate_json((tmp_path / MANIFEST).read_bytes()) == m
    # Rewriting the same manifest gives the same bytes and identity.
    assert write_manifest(tmp_path, m)[0] == sha
    report = ValidationReport(tolerance=1e-5, maxAbsError=0, eagerMicros=3, compiledMicros=2, speedup=1.5)
    sha2, size = write_manifest(tmp_path, m.model_copy(update={"report": report}))
    assert sha2 != sha and verify_bundle(tmp_path, sha2).report == report
    assert size == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_write_manifest_refuses_subdirectories(tmp_path: Path) -> None:
    make_fake_bundle(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(ArtifactError, match="'sub'"):
        write_manifest(tmp_path, read_manifest(tmp_path))


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[Path, str]:
    d = tmp_path / "b"
    _, sha = make_fake_bundle(d)
    return d, sha


def _rewrite_manifest(d: Path, edit) -> str:
    doc = json.loads((d / MANIFEST).read_bytes())
    edit(doc)
    data = json.dumps(doc).encode()
    (d / MANIFEST).write_bytes(data)
    return sha256_bytes(data)


def test_missing_manifest(bundle: tuple[Path, str]) -> None:
    d, _ = bundle
    (d / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.json is missing"):
        verify_bundle(d)


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        verify_bundle(tmp_path / "nope")


def test_wrong_expected_sha(bundle: tuple[Path, str]) -> None:
    d, _ = bundle
    with pytest.raises(ArtifactError, match=r"manifest.json: sha256 is .* expected 0{64}"):
        verify_bundle(d, "0" * 64)


def test_wrong_expected_key(bundle: tuple[Path, str]) -> None:
    d, sha = bundle
    with pytest.raises(ArtifactError, match="key is"):
        verify_bundle(d, sha, expected_key="f" * 64)


@pytest.mark.parametrize("name", DATA_FILES)
def test_flipped_byte(bundle: tuple[Path, str], name: str) -> None:
    d, sha = bundle
    data = bytearray((d / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / name).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{name}: sha256 is"):
        verify_bundle(d, sha)


@pytest.mark.parametrize("name", DATA_FILES)
def test_truncated_file(bundle: tuple[Path, str], name: str) -> None:
    d, sha = bundle
    (d / name).write_bytes((d / name).read_bytes()[:-1])
    with pytest.raises(ArtifactError, match=rf"{name}: size is 4095 bytes, manifest says 4096"):
        verify_bundle(d, sha)


def test_missing_file(bundle: tuple[Path, str]) -> None:
    d, sha = bundle
    (d / TRAIN_BACKWARD).unlink()
    with pytest.raises(ArtifactError, match=rf"{TRAIN_BACKWARD}: listed in the manifest but missing"):
        verify_bundle(d, sha)


@pytest.mark.parametrize("extra", ["evil.so", ".hidden", "subdir"])
def test_extra_file(bundle: tuple[Path, str], extra: str) -> None:
    d, sha = bundle
    if extra == "subdir":
        (d / extra).mkdir()
    else:
        (d / extra).write_bytes(b"x")
    with pytest.raises(ArtifactError, match=rf"{extra}: not listed in the manifest"):
        verify_bundle(d, sha)


def test_symlinked_file_is_refused(bundle: tuple[Path, str], tmp_path: Path) -> None:
    d, sha = bundle
    (tmp_path / "elsewhere").write_bytes((d / PARAMS).read_bytes())
    (d / PARAMS).unlink()
    (d / PARAMS).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ArtifactError, match=rf"{PARAMS}: listed in the manifest but missing"):
        verify_bundle(d, sha)


@pytest.mark.parametrize("name", ["../x", "/abs", "sub/forward.pt2", "..", ".hidden", "a\\b", MANIFEST, ""])
def test_path_traversal_names(bundle: tuple[Path, str], name: str) -> None:
    d, _ = bundle

    def edit(doc: dict) -> None:
        doc["files"][name] = doc["files"].pop(FORWARD)

    sha = _rewrite_manifest(d, edit)
    with pytest.raises(ArtifactError, match="not a plain bundle file name"):
        verify_bundle(d, sha)


def test_unknown_format(bundle: tuple[Path, str]) -> None:
    d, _ = bundle
    sha = _rewrite_manifest(d, lambda doc: doc.update(format="esper.dev/kernel-bundle/v3"))
    with pytest.raises(ArtifactError, match=r"unknown format 'esper\.dev/kernel-bundle/v3'"):
        verify_bundle(d, sha)


def test_format_v1_bundle_still_verifies(tmp_path: Path) -> None:
    """A bundle written before the training packages (forward + a recomputing backward) loads as v1."""
    d = tmp_path / "v1"
    d.mkdir()
    for name in (FORWARD, BACKWARD, PARAMS):
        (d / name).write_bytes(name.encode())
    toolchain = Toolchain(torch="2.13.0", capability="cpu-avx2")
    m = Manifest(
        format=FORMAT_V1,
        key=kernel_key(DIGEST, "cpu", CompileOptions(), toolchain),
        irDigest=DIGEST,
        target="cpu",
        toolchain=toolchain,
        graph={},
    )
    sha, _ = write_manifest(d, m)
    doc = json.loads((d / MANIFEST).read_bytes())
    assert doc["format"] == "esper.dev/kernel-bundle/v1" and doc["saved"] == []
    got = verify_bundle(d, sha)
    assert got.format == FORMAT_V1
    assert got.data_files == ("forward.pt2", "backward.pt2", "params.safetensors")
    assert set(got.files) == set(got.data_files)


def test_saved_tensors_round_trip(bundle: tuple[Path, str]) -> None:
    d, _ = bundle
    saved = [
        {"kind": "input", "index": 0, "shape": ["batch", 4], "dtype": "float32"},
        {"kind": "activation", "index": 0, "shape": ["16*batch", 64], "dtype": "float32"},
        {"kind": "output", "index": 1, "shape": [0], "dtype": "float16"},
    ]
    sha = _rewrite_manifest(d, lambda doc: doc.update(saved=saved))
    m = verify_bundle(d, sha)
    assert m.format == FORMAT == "esper.dev/kernel-bundle/v2"
    assert [s.model_dump() for s in m.saved] == saved
    assert m.data_files == ("forward.pt2", "train_forward.pt2", "train_backward.pt2", "params.safetensors")


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"kind": "buffer", "index": 0, "shape": [1]}, "saved.0.kind"),
        ({"kind": "input", "index": -1, "shape": [1]}, "saved.0.index"),
        ({"kind": "input", "index": 0, "shape": [1] * 9}, "saved.0.shape"),
    ],
)
def test_bad_saved_entry_is_refused(bundle: tuple[Path, str], entry: dict, field: str) -> None:
    d, _ = bundle
    sha = _rewrite_manifest(d, lambda doc: doc.update(saved=[entry]))
    with pytest.raises(ArtifactError, match=rf"invalid manifest: {field}"):
        verify_bundle(d, sha)


def test_unknown_field(bundle: tuple[Path, str]) -> None:
    d, _ = bundle
    sha = _rewrite_manifest(d, lambda doc: doc.update(pickle="yes"))
    with pytest.raises(ArtifactError, match="invalid manifest: pickle"):
        verify_bundle(d, sha)


@pytest.mark.parametrize("data", [b"not json{", b"\xff\xfe", b"[1, 2]"])
def test_manifest_not_json(bundle: tuple[Path, str], data: bytes) -> None:
    d, _ = bundle
    (d / MANIFEST).write_bytes(data)
    with pytest.raises(ArtifactError, match=r"manifest\.json: not"):
        verify_bundle(d, sha256_bytes(data))
