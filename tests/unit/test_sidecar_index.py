"""The shared-volume index: atomic writes, tolerant reads, and a watcher that costs one stat per step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from esper.sidecar import index as index_mod
from esper.sidecar.index import (
    Index,
    IndexCorrupt,
    IndexEntry,
    IndexWatcher,
    bundle_path,
    read_index,
    write_index,
)


def _entry(name: str = "cpu-0123456789abcdef", sha: str = "a" * 64) -> IndexEntry:
    return IndexEntry(
        name=name,
        namespace="ml",
        key="b" * 64,
        sha256=sha,
        target="cpu",
        blueprint="mlp",
        path=f"kernels/{name}",
        size=123,
    )


def test_missing_index_reads_as_empty(tmp_path: Path) -> None:
    assert read_index(tmp_path) == Index()
    assert read_index(tmp_path / "absent") == Index()


def test_write_then_read_round_trips_sorted(tmp_path: Path) -> None:
    written = write_index(tmp_path, [_entry("zeta"), _entry("alpha")], version=3)
    got = read_index(tmp_path)
    assert got == written and got.version == 3 and got.updatedAt
    assert [k.name for k in got.kernels] == ["alpha", "zeta"]
    assert got.get("zeta") == _entry("zeta") and got.get("nope") is None
    assert got.kernels[0].bundle_dir(tmp_path) == tmp_path / "kernels" / "alpha"
    doc = json.loads((tmp_path / "index.json").read_text())
    assert set(doc) == {"version", "updatedAt", "kernels"}
    fields = {"name", "namespace", "key", "sha256", "target", "blueprint", "path", "size"}
    assert set(doc["kernels"][0]) == fields


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_index(tmp_path, [_entry()], version=1)
    before = (tmp_path / "index.json").read_bytes()

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(index_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_index(tmp_path, [], version=2)
    assert (tmp_path / "index.json").read_bytes() == before  # the old index is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]


def test_corrupt_index_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(IndexCorrupt, match=r"index\.json: not a valid kernel index"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"version": 1, "kernels": [{"name": "x"}]}))
    with pytest.raises(IndexCorrupt, match=r"kernels\.0\.key"):
        read_index(tmp_path)


def test_entries_cannot_point_outside_the_kernel_dir() -> None:
    with pytest.raises(ValueError, match="must be relative"):
        IndexEntry.model_validate({**_entry().model_dump(), "path": "../etc"})
    with pytest.raises(ValueError, match="must be relative"):
        IndexEntry.model_validate({**_entry().model_dump(), "path": "/etc"})
    with pytest.raises(ValueError, match="not a Kubernetes object name"):
        bundle_path("/k", "../x")


def test_watcher_stats_once_and_parses_only_on_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watcher = IndexWatcher(tmp_path)
    first = watcher.changed()
    assert first == Index()  # the first call always answers (an absent file is an empty index)
    assert watcher.changed() is None

    write_index(tmp_path, [_entry()], version=1)
    parses: list[bytes] = []
    real_parse = index_mod.parse_index
    monkeypatch.setattr(
        index_mod, "parse_index", lambda data, source="": parses.append(data) or real_parse(data)
    )
    stats: list[object] = []
    real_stat = os.stat
    monkeypatch.setattr(index_mod.os, "stat", lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))

    got = watcher.changed()
    assert got is not None and got.version == 1 and watcher.current == got
    assert len(parses) == 1
    stats.clear()
    for _ in range(100):  # the steady state: one stat per call, no read, no parse
        assert watcher.changed() is None
    assert len(stats) == 100 and len(parses) == 1

    write_index(tmp_path, [_entry()], version=2)  # same size, maybe same mtime tick: a new inode
    got = watcher.changed()
    assert got is not None and got.version == 2 and len(parses) == 2

    (tmp_path / "index.json").unlink()
    assert watcher.changed() == Index()
    assert watcher.changed() is None


def test_watcher_retries_a_corrupt_file(tmp_path: Path) -> None:
    watcher = IndexWatcher(tmp_path)
    (tmp_path / "index.json").write_text("garbage")
    with pytest.raises(IndexCorrupt):
        watcher.changed()
    with pytest.raises(IndexCorrupt):  # not remembered as seen: still an error, not silence
        watcher.changed()
    write_index(tmp_path, [_entry()], version=5)
    got = watcher.changed()
    assert got is not None and got.version == 5
