"""The bundle format's edges: plain names, manifest bytes, the atomic write, size limits, messages."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from esper import artifact
from esper.artifact import (
    MANIFEST,
    ArtifactError,
    is_plain_name,
    parse_manifest,
    read_manifest,
    read_manifest_bytes,
    verify_bundle,
    write_manifest,
)
from tests.support.s3 import make_fake_bundle


@pytest.mark.parametrize(
    ("name", "plain"),
    [
        ("forward.pt2", True),
        ("a", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("a.b-c_d", True),
        ("a..b", False),  # the pattern admits it; the '..' check must refuse it
        ("..", False),
        (".hidden", False),
        ("-dash", False),
        ("a/b", False),
        ("a\\b", False),
        ("", False),
    ],
)
def test_plain_names(name: str, plain: bool) -> None:
    assert is_plain_name(name) is plain


def test_manifest_bytes_are_sorted_two_space_json_with_one_newline(tmp_path: Path) -> None:
    make_fake_bundle(tmp_path, seed=2)
    data = (tmp_path / MANIFEST).read_bytes()
    assert data.endswith(b"}\n") and not data.endswith(b"\n\n")
    lines = data.decode().splitlines()
    assert lines[0] == "{" and re.match(r'^  "[a-zA-Z]+": ', lines[1])  # indent 2, one key per line

    def sorted_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
        keys = [k for k, _ in pairs]
        assert keys == sorted(keys), keys
        return dict(pairs)

    doc = json.loads(data, object_pairs_hook=sorted_pairs)  # every object's keys in sorted order
    assert doc == read_manifest(tmp_path).model_dump(mode="json")


def test_a_data_file_with_a_bad_name_is_refused_by_name(tmp_path: Path) -> None:
    make_fake_bundle(tmp_path, seed=2)
    (tmp_path / "bad name").write_bytes(b"x")
    manifest = read_manifest(tmp_path)
    message = f"{tmp_path}: 'bad name' is not a plain bundle file name"
    with pytest.raises(ArtifactError, match=re.escape(message)):
        write_manifest(tmp_path, manifest)


def test_manifest_write_is_atomic_beside_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temp file is hidden and in the bundle directory (a rename within one filesystem); if the
    rename fails, the old manifest.json is intact and no temp file is left."""
    make_fake_bundle(tmp_path, seed=2)
    before = (tmp_path / MANIFEST).read_bytes()
    manifest = read_manifest(tmp_path).model_copy(update={"createdAt": "2030-01-01T00:00:00Z"})
    seen: list[Path] = []

    def failing_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(Path(src))
        assert Path(src).is_file()
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "not-a-dir"))  # only the bundle dir works
    with pytest.raises(OSError, match="disk gone"):
        write_manifest(tmp_path, manifest)
    assert len(seen) == 1 and seen[0].parent == tmp_path
    assert re.fullmatch(r"\.manifest\.json\..+\.tmp", seen[0].name), seen[0].name
    assert (tmp_path / MANIFEST).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_manifest_size_limit_is_inclusive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_fake_bundle(tmp_path, seed=2)
    size = (tmp_path / MANIFEST).stat().st_size
    monkeypatch.setattr(artifact, "MAX_MANIFEST_BYTES", size)
    assert read_manifest_bytes(tmp_path) == (tmp_path / MANIFEST).read_bytes()  # exactly the limit: read
    monkeypatch.setattr(artifact, "MAX_MANIFEST_BYTES", size - 1)
    with pytest.raises(ArtifactError, match=f"manifest.json is larger than {size - 1} bytes"):
        read_manifest_bytes(tmp_path)


def test_invalid_manifest_lists_every_problem_at_its_dotted_path(tmp_path: Path) -> None:
    make_fake_bundle(tmp_path, seed=2)
    doc = json.loads((tmp_path / MANIFEST).read_bytes())
    doc["key"] = "short"
    doc["files"]["forward.pt2"]["sha256"] = "nope"
    with pytest.raises(ArtifactError) as ei:
        parse_manifest(json.dumps(doc).encode(), "src")
    message = str(ei.value)
    assert message.startswith("src: invalid manifest: ")
    problems = message.removeprefix("src: invalid manifest: ").split("; ")
    assert [p.split(": ")[0] for p in problems] == ["key", "files.forward.pt2.sha256"]


def test_read_and_verify_name_the_manifest_file_at_fault(tmp_path: Path) -> None:
    make_fake_bundle(tmp_path, seed=2)
    (tmp_path / MANIFEST).write_bytes(b"{not json")
    where = re.escape(str(tmp_path / MANIFEST))
    with pytest.raises(ArtifactError, match=f"^{where}: not valid JSON"):
        read_manifest(tmp_path)
    with pytest.raises(ArtifactError, match=f"^{where}: not valid JSON"):
        verify_bundle(tmp_path)


def test_canonical_json_is_compact_sorted_utf8() -> None:
    assert artifact.canonical_json({"b": "é", "a": [1, {"d": 2, "c": None}]}) == (
        '{"a":[1,{"c":null,"d":2}],"b":"é"}'.encode()
    )


def test_hash_file_reads_in_bounded_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A multi-gigabyte package must not be read into memory at once."""
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(2 * 1024 * 1024 + 5))
    sizes: list[int | None] = []

    class Recording:
        def __init__(self, f: Any) -> None:
            self.f = f

        def read(self, n: int | None = -1) -> bytes:
            sizes.append(n)
            return self.f.read(n)

        def __enter__(self) -> Recording:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

    real_open = open
    monkeypatch.setattr(artifact, "open", lambda p, mode: Recording(real_open(p, mode)), raising=False)
    assert artifact.hash_file(path)[1] == 2 * 1024 * 1024 + 5
    assert len(sizes) >= 3 and all(n is not None and 0 < n <= 1024 * 1024 for n in sizes), sizes


def test_manifest_is_readable_by_other_users(tmp_path: Path) -> None:
    """mkstemp makes 0600 files; the trainer reading a bundle may run as another user than its writer."""
    make_fake_bundle(tmp_path, seed=2)
    assert (tmp_path / MANIFEST).stat().st_mode & 0o777 == 0o644


class Trust:
    """A Verifier that records what it was asked and accepts, or refuses with `refusal`."""

    def __init__(self, refusal: str | None = None) -> None:
        self.calls: list[tuple[bytes, bytes | None, str]] = []
        self.refusal = refusal

    def verify(self, manifest_bytes: bytes, signature_bytes: bytes | None, source: str = "") -> str:
        self.calls.append((manifest_bytes, signature_bytes, source))
        if self.refusal is not None:
            raise ArtifactError(self.refusal)
        return "k1"


def test_private_copy_copies_only_the_listed_files_and_verifies_the_copy(tmp_path: Path) -> None:
    src, dest = tmp_path / "shared", tmp_path / "private"
    make_fake_bundle(src, seed=3)
    (src / "planted.py").write_text("print('hi')")  # not listed: not copied
    trust = Trust()
    manifest = artifact.private_copy(src, dest, hashlib.sha256((src / MANIFEST).read_bytes()).hexdigest(),
                                     trusted=trust)  # fmt: skip
    assert manifest == read_manifest(src)
    assert trust.calls == [((src / MANIFEST).read_bytes(), (src / "manifest.sig").read_bytes(), str(src))]
    assert sorted(p.name for p in dest.iterdir()) == sorted([*artifact.DATA_FILES, MANIFEST, "manifest.sig"])
    for p in dest.iterdir():
        assert p.read_bytes() == (src / p.name).read_bytes()
    assert dest.stat().st_mode & 0o777 == 0o700  # only this process writes it


def test_private_copy_of_an_unsigned_bundle_has_no_signature(tmp_path: Path) -> None:
    src, dest = tmp_path / "shared", tmp_path / "private"
    make_fake_bundle(src, signed=False)
    trust = Trust()
    artifact.private_copy(src, dest, trusted=trust)
    assert trust.calls == [((src / MANIFEST).read_bytes(), None, str(src))]
    assert not (dest / "manifest.sig").exists() and (dest / MANIFEST).is_file()


def _tamper(src: Path, how: str) -> tuple[Path, str]:
    """Change one listed file of the bundle at `src`; returns it and the error private_copy must give."""
    path = src / artifact.DATA_FILES[0]
    data = path.read_bytes()
    entry = read_manifest(src).files[path.name]
    if how == "missing":
        path.unlink()
        return path, f"{path}: listed in the manifest but missing"
    if how == "symlink":
        (src / "elsewhere").write_bytes(data)
        path.unlink()
        path.symlink_to(src / "elsewhere")
        return path, f"{path}: listed in the manifest but missing"
    if how == "larger":
        path.write_bytes(data + b"x")
        return path, f"{path}: larger than the {entry.size} bytes the manifest records"
    if how == "smaller":
        path.write_bytes(data[:-1])
        return path, f"{path}: size is {entry.size - 1} bytes, manifest says {entry.size}"
    changed = bytes([data[0] ^ 1]) + data[1:]  # "changed": same size, other bytes
    path.write_bytes(changed)
    return path, f"{path}: sha256 is {hashlib.sha256(changed).hexdigest()}, manifest says {entry.sha256}"


@pytest.mark.parametrize("how", ["missing", "symlink", "larger", "smaller", "changed"])
def test_private_copy_refuses_a_listed_file_that_does_not_match(tmp_path: Path, how: str) -> None:
    src = tmp_path / "shared"
    make_fake_bundle(src, seed=4)
    _, message = _tamper(src, how)
    with pytest.raises(ArtifactError) as raised:
        artifact.private_copy(src, tmp_path / "private", trusted=Trust())
    assert str(raised.value) == message


def test_private_copy_checks_the_signature_and_sha256_before_reading_anything_else(tmp_path: Path) -> None:
    src, dest = tmp_path / "shared", tmp_path / "private"
    make_fake_bundle(src, seed=5)
    (src / artifact.DATA_FILES[0]).unlink()  # would fail later: the manifest checks come first
    with pytest.raises(ArtifactError, match=r"^untrusted$"):
        artifact.private_copy(src, dest, trusted=Trust(refusal="untrusted"))
    sha = hashlib.sha256((src / MANIFEST).read_bytes()).hexdigest()
    with pytest.raises(ArtifactError) as raised:
        artifact.private_copy(src, dest, "0" * 64, trusted=Trust())
    assert str(raised.value) == f"{src / MANIFEST}: sha256 is {sha}, expected {'0' * 64}"
    assert not dest.exists()
    with pytest.raises(ArtifactError) as raised:
        artifact.private_copy(tmp_path / "absent", dest, trusted=Trust())
    assert str(raised.value) == f"{tmp_path / 'absent'}: bundle directory does not exist"


def test_a_manifest_of_an_unknown_format_names_the_known_ones_and_its_file(tmp_path: Path) -> None:
    src = tmp_path / "shared"
    make_fake_bundle(src, signed=False)
    (src / MANIFEST).write_text(json.dumps({"format": 99}))
    expected = (
        f"{src / MANIFEST}: unknown format 99 (expected one of {artifact.FORMAT_V1}, {artifact.FORMAT})"
    )
    with pytest.raises(ArtifactError) as raised:
        artifact.private_copy(src, tmp_path / "private", trusted=Trust())
    assert str(raised.value) == expected


class Reads(io.BytesIO):
    """A source that records how much each read asked for."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.sizes: list[int | None] = []

    def read(self, size: int | None = -1) -> bytes:
        self.sizes.append(size)
        return super().read(size)


def test_copy_capped_never_reads_more_than_one_byte_past_the_cap() -> None:
    data = os.urandom(10)
    fin, fout = Reads(data), io.BytesIO()
    assert artifact.copy_capped(fin, fout, 10, "src") == (hashlib.sha256(data).hexdigest(), 10)
    assert fin.sizes == [11, 1] and fout.getvalue() == data  # the cap plus one, then one to see the end
    planted = Reads(os.urandom(10_000_000))
    with pytest.raises(ArtifactError) as raised:
        artifact.copy_capped(planted, io.BytesIO(), 10, "src")
    assert str(raised.value) == "src: larger than the 10 bytes the manifest records"
    assert planted.sizes == [11]  # refused after one read of 11 bytes, not the whole file


def test_a_signature_is_read_up_to_its_size_limit(tmp_path: Path) -> None:
    sig = tmp_path / "manifest.sig"
    sig.write_bytes(b"s" * artifact.MAX_SIGNATURE_BYTES)
    assert artifact.read_signature_bytes(tmp_path) == b"s" * artifact.MAX_SIGNATURE_BYTES
    sig.write_bytes(b"s" * (artifact.MAX_SIGNATURE_BYTES + 1))
    with pytest.raises(ArtifactError) as raised:
        artifact.read_signature_bytes(tmp_path)
    assert str(raised.value) == f"{sig}: larger than {artifact.MAX_SIGNATURE_BYTES} bytes"


def test_verify_bundle_asks_the_verifier_about_the_bundle_it_names(tmp_path: Path) -> None:
    make_fake_bundle(tmp_path, seed=6)
    trust = Trust()
    verify_bundle(tmp_path, trusted=trust)
    assert trust.calls == [
        ((tmp_path / MANIFEST).read_bytes(), (tmp_path / "manifest.sig").read_bytes(), str(tmp_path))
    ]


def test_a_signature_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    make_fake_bundle(tmp_path, seed=7)
    sig = tmp_path / "manifest.sig"
    (tmp_path.parent / "sig-copy").write_bytes(sig.read_bytes())
    sig.unlink()
    sig.symlink_to(tmp_path.parent / "sig-copy")
    with pytest.raises(ArtifactError) as raised:
        verify_bundle(tmp_path)
    assert str(raised.value) == f"{sig}: not a regular file"


def test_a_file_that_changes_size_while_hashed_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_fake_bundle(tmp_path, seed=8)
    path = tmp_path / artifact.DATA_FILES[0]
    size = path.stat().st_size
    monkeypatch.setattr(artifact, "hash_file", lambda p: ("0" * 64, size + 5))  # it grew after the stat
    with pytest.raises(ArtifactError) as raised:
        verify_bundle(tmp_path)
    assert str(raised.value) == f"{path}: size is {size + 5} bytes, manifest says {size}"
