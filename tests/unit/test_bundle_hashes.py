"""Bundle hashes against hashlib: files larger than one read chunk, and a change past the first chunk."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from esper.artifact import FORWARD, MANIFEST, ArtifactError, hash_file, sha256_bytes, verify_bundle
from tests.support.s3 import make_fake_bundle

# Over the 1 MiB read chunk, and not a multiple of it: the last read is a short one.
BIG = 3 * 1024 * 1024 + 17


@pytest.mark.parametrize("size", [0, 1, 1024 * 1024, BIG])
def test_hash_file_equals_hashlib_over_the_whole_file(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert hash_file(path) == (hashlib.sha256(data).hexdigest(), size)
    assert sha256_bytes(data) == hashlib.sha256(data).hexdigest()


def test_verify_bundle_sees_a_change_in_the_last_byte_of_a_large_file(tmp_path: Path) -> None:
    key, sha = make_fake_bundle(tmp_path / "b", seed=3, size=BIG)
    path = tmp_path / "b" / FORWARD
    assert verify_bundle(tmp_path / "b", sha, expected_key=key).files[FORWARD].size == BIG
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, differs only in the last chunk
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{FORWARD}: sha256 is {hashlib.sha256(data).hexdigest()}"):
        verify_bundle(tmp_path / "b", sha, expected_key=key)


def test_the_manifest_sha256_is_hashlib_of_the_file_written(tmp_path: Path) -> None:
    _, sha = make_fake_bundle(tmp_path / "b", seed=4, size=BIG)
    assert sha == hashlib.sha256((tmp_path / "b" / MANIFEST).read_bytes()).hexdigest()
