"""The sync sidecar's bookkeeping without a cluster: what a Kernel asks for, the watch events, the
index on disk, failures and their retries, make-before-break and readiness (a fake API and a
LocalStore; tests/integration/test_sidecar.py runs it against an API server and S3)."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from esper.artifact import FORWARD, ArtifactError
from esper.sidecar import sync as sync_mod
from esper.sidecar.index import IndexEntry, read_index, write_index
from esper.sidecar.sync import (
    RESYNC_SECONDS,
    Desired,
    KernelSync,
    SyncConfig,
    desired_of,
    store_uri_of,
)
from esper.storage import BundleNotFound, LocalStore, StorageError, Store, open_store
from tests.support.s3 import make_fake_bundle

A, B, C = "a" * 64, "b" * 64, "c" * 64


def _obj(
    name: str,
    key: str = A,
    sha: str | None = B,
    uri: str | None = None,
    labels: dict[str, str] | None = None,
    phase: str = "Ready",
    size: int = 3,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"name": name, "namespace": "team", "labels": labels or {}},
        "spec": {"blueprint": "mlp", "target": "cpu", "key": key},
        "status": {"phase": phase},
    }
    if sha is not None:
        obj["status"]["artifact"] = {"uri": uri or f"s3://b/p/kernels/{key}", "sha256": sha, "size": size}
    return obj


class FakeApi:
    """list_namespaced_custom_object over a list of objects (a copy each call, as the API gives)."""

    def __init__(self, items: list[dict[str, Any]], rv: str = "7") -> None:
        self.items, self.rv, self.calls = items, rv, 0

    def list_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.calls += 1
        return {"metadata": {"resourceVersion": self.rv}, "items": json.loads(json.dumps(self.items))}


def _sync(tmp_path: Path, items: list[dict[str, Any]] | None = None, **config: Any) -> KernelSync:
    opts: dict[str, Any] = {"kernel_dir": tmp_path / "vol", "kernels": ("k",), "namespace": "team"}
    sync = KernelSync(SyncConfig(**{**opts, **config}), api_client=object())
    sync.api = FakeApi(items or [])  # type: ignore[assignment]
    return sync


def _metric(sync: KernelSync, name: str, **labels: str) -> float:
    return sync.metrics.registry.get_sample_value(name, labels) or 0.0


def _ready_kernel(tmp_path: Path, name: str, seed: int, **kw: Any) -> tuple[dict[str, Any], str, str]:
    """A bundle put in the store at tmp_path/store and a Ready Kernel object for it; (obj, key, sha)."""
    key, sha = make_fake_bundle(tmp_path / f"src-{name}-{seed}", seed=seed, size=256)
    ref = open_store(str(tmp_path / "store")).put_bundle(key, tmp_path / f"src-{name}-{seed}")
    obj = _obj(name, key, ref.sha256, ref.uri, size=ref.size, **kw)
    return obj, key, sha


# ---- what a Kernel object asks for -----------------------------------------------------------------


def test_desired_of_reads_every_field() -> None:
    d = desired_of(_obj("k", size=9), "default")
    assert d == Desired(
        IndexEntry(
            name="k",
            namespace="team",
            key=A,
            sha256=B,
            target="cpu",
            blueprint="mlp",
            path="kernels/k",
            size=9,
        ),
        f"s3://b/p/kernels/{A}",
    )
    bare = _obj("k")
    del bare["metadata"]["namespace"]
    del bare["spec"]["blueprint"]
    entry = desired_of(bare, "default", "cpu").entry  # type: ignore[union-attr]
    assert (entry.namespace, entry.blueprint) == ("default", "")


def test_desired_of_skips_what_is_not_ready_or_not_for_this_target() -> None:
    assert desired_of(_obj("k", phase="Compiling"), "ns") is None
    assert desired_of(_obj("k", sha=None), "ns") is None  # Ready without an artifact
    assert desired_of({"metadata": None, "spec": None, "status": None}, "ns") is None
    assert desired_of(_obj("k"), "ns", "cuda-sm90") is None
    assert desired_of(_obj("k"), "ns", "cpu") is not None
    assert desired_of(_obj("k"), "ns", "cpu-avx512") is None  # one target, not a substring of it
    assert desired_of(_obj("k"), "ns", ("cpu-avx512", "cuda-sm90")) is None
    assert desired_of(_obj("k"), "ns", ("cpu-avx512", "cpu")) is not None


def test_desired_of_refuses_a_malformed_kernel() -> None:
    obj = _obj("k", sha="nope")
    with pytest.raises(ValueError, match=r"(?s)^Kernel 'k' is malformed: .*sha256"):
        desired_of(obj, "ns")
    del obj["metadata"]["name"]
    obj["status"]["artifact"]["sha256"] = B
    with pytest.raises(ValueError, match=r"^Kernel None is malformed: 'name'$"):
        desired_of(obj, "ns")
    keyless = _obj("k")
    del keyless["spec"]["key"]  # an empty key is no key
    with pytest.raises(ValueError, match=r"(?s)^Kernel 'k' is malformed: .*key"):
        desired_of(keyless, "ns")


def test_store_uri_of() -> None:
    assert store_uri_of(f"s3://b/esper/kernels/{A}", A) == "s3://b/esper"
    assert store_uri_of(f"file:///s/kernels/{A}/", A) == "file:///s"
    with pytest.raises(ValueError) as info:
        store_uri_of(f"s3://b/esper/kernels/{B}", A)
    assert str(info.value) == f"artifact URI 's3://b/esper/kernels/{B}' does not end with '/kernels/{A}'"
    with pytest.raises(ValueError, match="does not end with"):  # nothing before the suffix: no store
        store_uri_of(f"/kernels/{A}", A)


# ---- what the watcher feeds ------------------------------------------------------------------------


def test_wanted_by_name_or_by_selector(tmp_path: Path) -> None:
    by_name = _sync(tmp_path)
    assert by_name.wanted(_obj("k")) and not by_name.wanted(_obj("other", labels={"app": "x"}))
    assert not by_name.wanted({})
    both = _sync(tmp_path / "2", selector="app=x")
    assert both.wanted(_obj("k")) and both.wanted(_obj("other", labels={"app": "x"}))
    assert not both.wanted(_obj("other", labels={"app": "y"}))
    assert not both.wanted({"metadata": {"name": "other", "labels": None}})
    by_selector = _sync(tmp_path / "3", kernels=(), selector="app=x")
    assert by_selector.wanted(_obj("any", labels={"app": "x"})) and not by_selector.wanted(_obj("k"))


def test_watch_events_update_what_is_observed(tmp_path: Path) -> None:
    sync = _sync(tmp_path, selector="app=x")
    try:
        assert sync._observed is None
        sync.apply_event({"type": "BOOKMARK", "object": _obj("k")})
        sync.apply_event({"type": "ADDED", "object": "not an object"})
        assert sync._observed is None and not sync._wake.is_set()
        sync.apply_event({"type": "ADDED", "object": _obj("k")})
        assert list(sync._observed or {}) == ["k"] and sync._wake.is_set()
        sync.apply_event({"type": "ADDED", "object": _obj("other", labels={"app": "x"})})
        sync.apply_event({"type": "MODIFIED", "raw_object": _obj("other", labels={"app": "y"}), "object": {}})
        assert list(sync._observed or {}) == ["k"]  # relabelled: no longer wanted
        sync.apply_event({"type": "ADDED", "object": _obj("skipped")})  # neither named nor selected
        sync.apply_event({"type": "DELETED", "object": _obj("k")})
        assert sync._observed == {}
    finally:
        sync.stop()


def test_a_list_sets_what_readiness_waits_for(tmp_path: Path) -> None:
    sync = _sync(
        tmp_path, kernels=("k", "l", "m"), items=[_obj("k"), _obj("l", phase="Compiling"), _obj("x")]
    )
    try:
        assert sync.list_kernels() == "7"
        assert sorted(sync._observed or {}) == ["k", "l"] and sync._initial == {"k"}
        sync.api.items = [_obj("k"), _obj("l")]  # type: ignore[attr-defined]
        sync.list_kernels()
        assert sync._initial == {"k"}  # the first list's, kept
        sync.api.rv = ""  # type: ignore[attr-defined]
        assert sync.list_kernels() == ""
    finally:
        sync.stop()


def test_a_malformed_kernel_is_reported_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sync = _sync(tmp_path, items=[_obj("k", sha="nope")])
    try:
        with caplog.at_level(logging.ERROR, logger="esper.sidecar.sync"):
            sync.list_kernels()
            for _ in range(3):
                assert sync._desired() == {}
        assert _metric(sync, "esper_sync_errors_total", kind="bad_kernel") == 1
        assert [r.getMessage()[:30] for r in caplog.records] == ["Kernel 'k' is malformed: 1 val"]
        sync.apply_event({"type": "MODIFIED", "object": _obj("k")})  # fixed: forgotten, then wanted
        assert list(sync._desired()) == ["k"] and sync._bad == {}
        sync.apply_event({"type": "MODIFIED", "object": _obj("k", sha="nope")})
        sync._desired()
        assert _metric(sync, "esper_sync_errors_total", kind="bad_kernel") == 2  # broken again: said again
    finally:
        sync.stop()


# ---- reconcile -------------------------------------------------------------------------------------


def test_install_then_remove(tmp_path: Path) -> None:
    obj, _, _ = _ready_kernel(tmp_path, "k", 1)
    sync = _sync(tmp_path, items=[obj])
    vol = tmp_path / "vol"
    try:
        assert sync.reconcile(wait=True) is False and not sync.ready()  # nothing listed yet
        assert read_index(vol).kernels == [] and read_index(vol).version == 0
        assert sync.run_once() is True and sync.ready()
        index = read_index(vol)
        assert index.version == 2 and [e.name for e in index.kernels] == ["k"]  # v1: before the fetch
        assert index.kernels[0] == desired_of(obj, "team").entry  # type: ignore[union-attr]
        assert (vol / "kernels" / "k" / FORWARD).read_bytes() == (tmp_path / "src-k-1" / FORWARD).read_bytes()
        assert _metric(sync, "esper_sync_kernels_installed") == 1
        assert _metric(sync, "esper_sync_downloads_total", outcome="success") == 1
        assert _metric(sync, "esper_sync_last_success_timestamp") > 0
        assert sync.run_once() is True and read_index(vol).version == 2  # nothing changed: not rewritten
        assert _metric(sync, "esper_sync_downloads_total", outcome="success") == 1
        sync.api.items = []  # type: ignore[attr-defined]
        assert sync.run_once() is True
        assert read_index(vol).kernels == [] and read_index(vol).version == 3
        assert os.listdir(vol / "kernels") == [] and sync.ready()  # ready stays ready
        assert _metric(sync, "esper_sync_kernels_installed") == 0
    finally:
        sync.stop()


def test_a_new_size_for_the_same_bundle_only_rewrites_the_index(tmp_path: Path) -> None:
    obj, _, _ = _ready_kernel(tmp_path, "k", 1)
    sync = _sync(tmp_path, items=[obj])
    try:
        assert sync.run_once()
        inode = (tmp_path / "vol" / "kernels" / "k").stat().st_ino
        sync.api.items = [
            {**obj, "status": {**obj["status"], "artifact": {**obj["status"]["artifact"], "size": 1}}}
        ]  # type: ignore[attr-defined]
        assert sync.run_once()
        assert read_index(tmp_path / "vol").kernels[0].size == 1 and read_index(tmp_path / "vol").version == 3
        assert (tmp_path / "vol" / "kernels" / "k").stat().st_ino == inode  # not downloaded again
    finally:
        sync.stop()


class _Failing(Store):
    """A store whose fetches raise `error`; everything else is LocalStore's."""

    def __init__(self, inner: LocalStore, error: Exception | None) -> None:
        self.inner, self.error, self.fetches = inner, error, 0

    @property
    def uri(self) -> str:
        return self.inner.uri

    def fetch_bundle(self, key: str, dest_dir: Path, expected_sha256: str | None = None, **kw: Any) -> Path:
        self.fetches += 1
        if self.error is not None:
            raise self.error
        return self.inner.fetch_bundle(key, dest_dir, expected_sha256, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    put_bundle = list_keys = delete_bundle = read_manifest_bytes = read_signature_bytes = _download = None  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("error", "outcome", "kind", "settled"),
    [
        (StorageError("S3 is down"), "storage_error", "storage", False),
        (ArtifactError("bad bytes"), "artifact_error", "artifact", True),
        (BundleNotFound("no such bundle"), "not_found", "not_found", True),
        (ValueError("no store for that URI"), "error", "internal", True),
        (RuntimeError("a bug"), "error", "internal", False),
    ],
)
def test_a_failed_fetch_is_counted_retried_and_settles_readiness_or_not(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    outcome: str,
    kind: str,
    settled: bool,
) -> None:
    obj, _, _ = _ready_kernel(tmp_path, "k", 1)
    store = _Failing(LocalStore(tmp_path / "store"), error)
    sync = _sync(tmp_path, items=[obj], retry_base=10.0, retry_max=40.0)
    sync.store_factory = lambda uri: store  # type: ignore[assignment]
    monkeypatch.setattr(sync_mod.random, "uniform", lambda lo, hi: hi)  # the backoff's jitter at its top
    try:
        with caplog.at_level(logging.WARNING, logger="esper.sidecar.sync"):
            assert sync.run_once() is False
        assert sync.ready() is settled  # a settled failure is done, for readiness
        message = str(error) if outcome != "error" or settled else repr(error)
        assert sync.failures() == {"k": message}
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert said == [f"k not installed (attempt 1, retry in 10.0s): {message}"]
        assert _metric(sync, "esper_sync_downloads_total", outcome=outcome) == 1
        assert _metric(sync, "esper_sync_errors_total", kind=kind) == 1
        failure = sync._failures["k"]
        assert (failure.attempts, failure.settled, failure.sha256) == (
            1,
            settled,
            obj["status"]["artifact"]["sha256"],
        )
        assert 9.0 < sync._next_wait() <= 10.0  # attempt 1: base 10, half fixed and half jitter
        assert sync.run_once() is False and store.fetches == 1  # not due yet: not fetched again
        sync._failures["k"].next_at = 0.0  # due now
        assert sync.run_once() is False and store.fetches == 2
        assert sync._failures["k"].attempts == 2 and 19.0 < sync._next_wait() <= 20.0
        assert read_index(tmp_path / "vol").kernels == []
        store.error = None
        sync._failures["k"].next_at = 0.0
        assert sync.run_once() is True and sync.failures() == {} and sync.ready()
    finally:
        sync.stop()


def test_a_new_sha256_is_fetched_at_once_and_counts_attempts_from_one(tmp_path: Path) -> None:
    obj, _, _ = _ready_kernel(tmp_path, "k", 1)
    store = _Failing(LocalStore(tmp_path / "store"), StorageError("down"))
    sync = _sync(tmp_path, items=[obj], retry_base=100.0, retry_max=100.0)
    sync.store_factory = lambda uri: store  # type: ignore[assignment]
    try:
        sync.run_once()
        sync._failures["k"].next_at = 0.0
        sync.run_once()
        assert sync._failures["k"].attempts == 2
        sync.api.items = [_obj("k", sha=C)]  # type: ignore[attr-defined]
        sync.run_once()  # the backoff was for the old bundle
        assert store.fetches == 3 and sync._failures["k"].attempts == 1 and sync._failures["k"].sha256 == C
        sync.api.items = []  # type: ignore[attr-defined]
        sync.run_once()
        assert sync.failures() == {}  # no longer wanted: forgotten
    finally:
        sync.stop()


def test_a_kernel_without_a_recorded_sha256_is_never_installed(tmp_path: Path) -> None:
    obj, _, _ = _ready_kernel(tmp_path, "k", 1)
    sync = _sync(tmp_path, items=[obj])
    try:
        d = desired_of(obj, "team")
        assert d is not None
        unrecorded = Desired(d.entry.model_copy(update={"sha256": ""}), d.bundle_uri)
        result = sync._fetch("k", unrecorded)
        assert (result.outcome, result.error, result.settled) == (
            "artifact_error",
            "Kernel k records no manifest sha256",
            True,
        )
        assert not (tmp_path / "vol" / "kernels" / "k").exists()
    finally:
        sync.stop()


def test_stores_are_opened_once_per_uri(tmp_path: Path) -> None:
    opened: list[str] = []
    sync = _sync(tmp_path)
    sync.store_factory = lambda uri: opened.append(uri) or LocalStore(tmp_path / uri[-1])  # type: ignore[assignment, func-returns-value]
    fixed = _sync(tmp_path / "2", store_uri="file:///fixed")
    fixed.store_factory = lambda uri: opened.append(uri) or LocalStore(tmp_path)  # type: ignore[assignment, func-returns-value]
    try:
        d1 = desired_of(_obj("k", uri=f"s3://one/kernels/{A}"), "ns")
        d2 = desired_of(_obj("l", uri=f"s3://two/x/kernels/{A}"), "ns")
        assert d1 is not None and d2 is not None
        assert sync._store(d1) is sync._store(d1) and sync._store(d2) is not sync._store(d1)
        assert opened == ["s3://one", "s3://two/x"]
        assert fixed._store(d1) is fixed._store(d2)
        assert opened[2:] == ["file:///fixed"]  # the configured store, whatever the URI says
    finally:
        sync.stop()
        fixed.stop()


def test_make_before_break_until_the_replacement_is_installed_or_settled(tmp_path: Path) -> None:
    """A Kernel no longer wanted stays while a wanted one is on its way; a settled failure ends the wait."""
    old, _, _ = _ready_kernel(tmp_path, "old", 1)
    new, _, _ = _ready_kernel(tmp_path, "new", 2)
    store = _Failing(LocalStore(tmp_path / "store"), None)
    sync = _sync(tmp_path, items=[old], kernels=("old", "new"))
    sync.store_factory = lambda uri: store  # type: ignore[assignment]
    vol = tmp_path / "vol"
    try:
        assert sync.run_once()
        store.error = StorageError("down")
        sync.api.items = [new]  # type: ignore[attr-defined]
        assert sync.run_once() is False
        assert [e.name for e in read_index(vol).kernels] == ["old"] and (vol / "kernels" / "old").is_dir()
        store.error = ArtifactError("bad bundle")  # settled: waiting longer would not help
        sync._failures["new"].next_at = 0.0
        assert sync.run_once() is False
        assert read_index(vol).kernels == [] and os.listdir(vol / "kernels") == []
        store.error = None
        sync._failures["new"].next_at = 0.0
        assert sync.run_once() and [e.name for e in read_index(vol).kernels] == ["new"]
    finally:
        sync.stop()


def test_a_changed_bundle_replaces_the_installed_one(tmp_path: Path) -> None:
    v1, _, _ = _ready_kernel(tmp_path, "k", 1)
    v2, _, sha2 = _ready_kernel(tmp_path, "k", 2)
    sync = _sync(tmp_path, items=[v1])
    try:
        assert sync.run_once()
        sync.api.items = [v2]  # type: ignore[attr-defined]
        assert sync.run_once()
        entry = read_index(tmp_path / "vol").get("k")
        assert entry is not None and entry.sha256 == v2["status"]["artifact"]["sha256"] == sha2
        assert os.listdir(tmp_path / "vol" / "kernels") == ["k"]
    finally:
        sync.stop()


def test_strangers_in_the_volume_are_removed_but_hidden_entries_left(tmp_path: Path) -> None:
    obj, _, _ = _ready_kernel(tmp_path, "k", 1)
    sync = _sync(tmp_path, items=[obj])
    kernels = tmp_path / "vol" / "kernels"
    try:
        (kernels / "stray").mkdir()
        (kernels / "stray" / "x").write_text("x")
        (kernels / "loose-file").write_text("x")
        (kernels / ".in-progress").mkdir()  # a fetch's temporary directory
        assert sync.run_once()
        assert sorted(os.listdir(kernels)) == [".in-progress", "k"]
    finally:
        sync.stop()


def test_an_index_that_cannot_be_written_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    obj, _, _ = _ready_kernel(tmp_path, "k", 1)
    sync = _sync(tmp_path, items=[obj])

    def refuse(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    real = sync_mod.write_index
    monkeypatch.setattr(sync_mod, "write_index", refuse)
    try:
        sync.run_once()
        assert _metric(sync, "esper_sync_errors_total", kind="index") == 2  # before and after the fetch
        assert read_index(tmp_path / "vol").kernels == [] and sync._version == 0
        monkeypatch.setattr(sync_mod, "write_index", real)
        sync.run_once()
        assert [e.name for e in read_index(tmp_path / "vol").kernels] == ["k"] and sync._version == 1
    finally:
        sync.stop()


# ---- a restart keeps the volume ----------------------------------------------------------------------


def test_a_restart_keeps_only_what_still_verifies(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good, _, _ = _ready_kernel(tmp_path, "good", 1)
    bad, _, _ = _ready_kernel(tmp_path, "bad", 2)
    first = _sync(tmp_path, items=[good, bad], kernels=("good", "bad"))
    try:
        assert first.run_once()
    finally:
        first.stop()
    vol = tmp_path / "vol"
    (vol / "kernels" / "bad" / FORWARD).write_bytes(b"tampered")
    (vol / "kernels" / ".good.del-1234").mkdir()  # an interrupted removal
    (vol / "kernels" / ".tmp-file").write_text("x")
    with caplog.at_level(logging.WARNING, logger="esper.sidecar.sync"):
        second = _sync(tmp_path, items=[good, bad], kernels=("good", "bad"))
    try:
        assert sorted(second._installed) == ["good"] and second._version == 2
        assert sorted(os.listdir(vol / "kernels")) == ["bad", "good"]  # leftovers gone at once
        assert any(r.getMessage().startswith("dropping bad from the index: ") for r in caplog.records)
        second.api.items = [good]  # type: ignore[attr-defined]
        assert second.run_once()
        assert [e.name for e in read_index(vol).kernels] == ["good"] and read_index(vol).version == 3
        assert os.listdir(vol / "kernels") == ["good"]
    finally:
        second.stop()


def test_a_corrupt_index_starts_empty(tmp_path: Path) -> None:
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "index.json").write_text("{not json")
    sync = _sync(tmp_path)
    try:
        assert sync._installed == {} and sync._version == 0
        assert _metric(sync, "esper_sync_errors_total", kind="index") == 1
    finally:
        sync.stop()


def test_an_index_read_on_start_is_rewritten_once(tmp_path: Path) -> None:
    """The re-verified index is written at the first pass, even if nothing else changes."""
    obj, _, _ = _ready_kernel(tmp_path, "k", 1)
    first = _sync(tmp_path, items=[obj])
    try:
        first.run_once()
    finally:
        first.stop()
    entry = read_index(tmp_path / "vol").kernels[0]
    write_index(tmp_path / "vol", [entry], 41)
    second = _sync(tmp_path, items=[obj])
    try:
        assert second._version == 41 and second.run_once()
        assert read_index(tmp_path / "vol").version == 42
        assert second.run_once() and read_index(tmp_path / "vol").version == 42
    finally:
        second.stop()


# ---- timing ------------------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_half_fixed_half_jitter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = _sync(tmp_path, retry_base=1.5, retry_max=10.0)
    try:
        monkeypatch.setattr(sync_mod.random, "uniform", lambda lo, hi: hi)
        assert [sync._backoff(n) for n in (0, 1, 2, 3, 4, 5)] == [1.5, 1.5, 3.0, 6.0, 10.0, 10.0]
        monkeypatch.setattr(sync_mod.random, "uniform", lambda lo, hi: lo)
        assert [sync._backoff(n) for n in (1, 3, 9)] == [0.75, 3.0, 5.0]
    finally:
        sync.stop()


def test_next_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sync = _sync(tmp_path)
    monkeypatch.setattr(sync_mod.time, "monotonic", lambda: 1000.0)
    try:
        assert sync._next_wait() == RESYNC_SECONDS == 30.0
        sync._failures["k"] = sync_mod._Failure(B, 1, 1012.5, False, "x")
        assert sync._next_wait() == 12.5
        sync._failures["l"] = sync_mod._Failure(B, 1, 990.0, False, "x")  # overdue
        assert sync._next_wait() == 0.0
        sync._inflight["l"] = None  # type: ignore[assignment]  # being fetched: not waited for
        assert sync._next_wait() == 12.5
        sync._failures["k"].next_at = 2000.0
        assert sync._next_wait() == 30.0
    finally:
        sync._inflight.clear()
        sync.stop()


def test_remove_path(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    (tmp_path / "f").write_text("f")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for name in ("d", "f", "link", "missing"):
        sync_mod._remove_path(tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == ["target"] and (tmp_path / "target" / "keep").is_file()


# ---- the watch ---------------------------------------------------------------------------------------


class _WatchResponse:
    """What a watch request returns with _preload_content=False: newline-delimited JSON events."""

    status = 200

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events

    def stream(self, amt: Any = None, decode_content: bool = False) -> Any:
        for e in self.events:
            yield json.dumps(e).encode() + b"\n"

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


def test_the_watch_relists_after_every_kind_of_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """410 Gone relists at once; an API error or an unreachable API relists after a backoff; events
    between are applied. Every list and watch names the group, version, namespace and plural."""
    from kubernetes.client.rest import ApiException

    sync = _sync(tmp_path, kernels=("k", "l"), retry_base=0.01, retry_max=0.01, watch_timeout=7)
    lists: list[tuple[Any, ...]] = []
    watches: list[dict[str, Any]] = []
    gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}

    class Api:
        def list_namespaced_custom_object(self, *args: Any, watch: bool = False, **kwargs: Any) -> Any:
            """As the generated client's method (kubernetes.watch reads the return type here).

            :rtype: object
            """
            if not watch:
                lists.append((*args, kwargs))
                return {
                    "metadata": {"resourceVersion": str(len(lists))},
                    "items": [_obj("k")] if lists[1:] else [],
                }
            watches.append({k: v for k, v in kwargs.items() if k != "_preload_content"} | {"args": args})
            n = len(watches)
            if n == 1:
                return _WatchResponse([{"type": "ERROR", "object": gone}])
            if n == 2:
                raise ApiException(status=500, reason="boom")
            if n == 3:
                raise ApiException(status=502, reason="bad gateway")
            if n == 4:
                raise ConnectionError("refused")
            if n == 5:  # a good watch: the next one starts from its last bookmark
                bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}
                return _WatchResponse([{"type": "ADDED", "object": _obj("l")}, bookmark])
            if n == 6:
                observed.append(sorted(sync._observed or {}))
                raise ApiException(status=503, reason="busy")
            sync._stop.set()
            return _WatchResponse([{"type": "ADDED", "object": _obj("late")}])

    sync.api = Api()  # type: ignore[assignment]
    backoffs: list[int] = []
    observed: list[list[str]] = []
    sync._backoff = lambda attempts: backoffs.append(attempts) or 0.0  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.INFO, logger="esper.sidecar.sync"):
            loop = threading.Thread(target=sync._watch_loop, daemon=True)
            loop.start()
            loop.join(5)  # each retry waits its backoff, not forever
            assert not loop.is_alive()
        assert observed == [["k", "l"]]  # the good watch's event was applied
        assert sorted(sync._observed or {}) == [
            "k"
        ]  # the relist after it is the truth; "late" came after the stop
        assert [lst[:4] for lst in lists] == [("esper.dev", "v1alpha1", "team", "kernels")] * 6
        assert all(lst[4] == {"_request_timeout": (10, 60)} for lst in lists)
        # a relist after each failure; a successful watch goes on from where the last one ended
        assert [w["resource_version"] for w in watches] == ["1", "2", "3", "4", "5", "9", "6"]
        assert backoffs == [1, 2, 3, 1]  # attempts count failures in a row: a good watch starts again
        assert watches[0] == {
            "args": ("esper.dev", "v1alpha1", "team", "kernels"),
            "resource_version": "1",
            "timeout_seconds": 7,
            "allow_watch_bookmarks": True,
            "_request_timeout": (10, 37),
        }
        assert _metric(sync, "esper_sync_errors_total", kind="watch_expired") == 1
        assert _metric(sync, "esper_sync_errors_total", kind="kube_api") == 4
        assert [r.getMessage() for r in caplog.records] == [
            "watch expired (410 Gone): relisting",
            "Kubernetes API error (500 boom); retrying",
            "Kubernetes API error (502 bad gateway); retrying",
            "Kubernetes API unreachable (refused); serving what is installed, retrying",
            "Kubernetes API error (503 busy); retrying",
        ]
    finally:
        sync.stop()


def test_the_api_client_comes_from_the_cluster_or_kubeconfig(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from kubernetes import config

    seen: list[Any] = []
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setattr(
        config, "load_incluster_config", lambda client_configuration: seen.append(client_configuration)
    )
    client = sync_mod.make_api_client()
    assert client.configuration is seen[0]
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    monkeypatch.setattr(config, "new_client_from_config", lambda config_file: seen.append(config_file) or "c")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kc"))
    assert sync_mod.make_api_client() == "c" and seen[1] == str(tmp_path / "kc")
    monkeypatch.delenv("KUBECONFIG")
    monkeypatch.setenv("HOME", str(tmp_path))
    sync_mod.make_api_client()
    assert seen[2] == str(tmp_path / ".kube" / "config")


def test_remove_path_survives_a_racing_cleanup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever happens to the renamed-aside copy (removed by someone else, or not removable) is not
    an error: its name is gone from the volume, which is all a reader sees."""
    (tmp_path / "gone").write_text("x")
    real_rename = os.rename

    def rename_then_lose(src: Any, dst: Any) -> None:
        real_rename(src, dst)
        os.unlink(dst)  # another cleanup got there first

    monkeypatch.setattr(sync_mod.os, "rename", rename_then_lose)
    sync_mod._remove_path(tmp_path / "gone")
    monkeypatch.setattr(sync_mod.os, "rename", real_rename)
    (tmp_path / "stuck").mkdir()
    real_rmtree = sync_mod.shutil.rmtree

    def rmtree(path: Any, ignore_errors: bool = False) -> None:
        if not ignore_errors:
            raise PermissionError(13, "Permission denied", str(path))
        real_rmtree(path, ignore_errors=True)

    monkeypatch.setattr(sync_mod.shutil, "rmtree", rmtree)
    sync_mod._remove_path(tmp_path / "stuck")
    assert os.listdir(tmp_path) == []


# ---- running -----------------------------------------------------------------------------------------


class _QuietApi(FakeApi):
    """Lists `items`; every watch stays open a moment, then says each item was modified."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        super().__init__(items)
        self.idle = threading.Event()

    def list_namespaced_custom_object(self, *args: Any, watch: bool = False, **kwargs: Any) -> Any:
        if not watch:
            return super().list_namespaced_custom_object(*args, **kwargs)
        self.idle.wait(0.05)
        return _WatchResponse([{"type": "MODIFIED", "object": o} for o in self.items])


def _until(condition: Any, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_start_watches_and_reconciles_until_stopped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    obj, _, sha = _ready_kernel(tmp_path, "k", 1)
    sync = _sync(tmp_path)
    sync.api = _QuietApi([obj])  # type: ignore[assignment]
    real, calls = sync.reconcile, []

    def reconcile(wait: bool = False) -> bool:
        calls.append(wait)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(wait)

    backoffs: list[int] = []
    sync.reconcile = reconcile  # type: ignore[method-assign]
    sync._backoff = lambda attempts: backoffs.append(attempts) or 0.01  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.ERROR, logger="esper.sidecar.sync"):
            assert sync.start() is sync
            _until(lambda: read_index(tmp_path / "vol").get("k") is not None, "the install")
        assert [(t.name, t.daemon) for t in sync._threads] == [
            ("esper-sync-watch", True),
            ("esper-sync", True),
        ]
        assert backoffs[0] == 3 and calls[0] is False
        assert _metric(sync, "esper_sync_errors_total", kind="internal") == 1
        assert [r.getMessage() for r in caplog.records][:1] == ["reconcile failed; retrying"]
    finally:
        sync.api.idle.set()  # type: ignore[attr-defined]
        sync.stop(timeout=10)
    assert not any(t.is_alive() for t in sync._threads)
    entry = read_index(tmp_path / "vol").get("k")
    assert entry is not None and entry.sha256 == obj["status"]["artifact"]["sha256"] == sha


def test_run_sync_serves_probes_and_syncs_until_asked_to_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    obj, _, _ = _ready_kernel(tmp_path, "k", 1)
    made: list[KernelSync] = []

    class Recording(KernelSync):
        def __init__(self, config: SyncConfig, **kw: Any) -> None:
            super().__init__(config, **kw)
            self.api = _QuietApi([obj])  # type: ignore[assignment]
            made.append(self)

    monkeypatch.setattr(sync_mod, "KernelSync", Recording)
    config = SyncConfig(
        kernel_dir=tmp_path / "vol",
        kernels=("k", "l"),
        selector="app=x",
        namespace="team",
        port=0,
        host="127.0.0.2",
    )
    result: list[int] = []
    with caplog.at_level(logging.INFO, logger="esper.sidecar.sync"):
        thread = threading.Thread(
            target=lambda: result.append(sync_mod.run_sync(config, api_client=object()))
        )
        thread.start()
        try:
            _until(lambda: bool(made) and made[0].ready(), "readiness")
            start = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("syncing"))
            port = int(start.rsplit("port ", 1)[1].rstrip(")"))
            assert port != 9090  # port 0: any free one
            assert (
                start
                == f"syncing k, l selector 'app=x' in namespace team into {tmp_path / 'vol'} (port {port})"
            )
            with urllib.request.urlopen(f"http://127.0.0.2:{port}/readyz", timeout=5) as resp:
                assert resp.status == 200
            with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5) as resp:
                assert b"esper_sync_kernels_installed 1.0" in resp.read()  # this sync's own registry
            with pytest.raises(OSError):  # bound to the configured host only
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
        finally:
            if made:
                made[0].api.idle.set()  # type: ignore[attr-defined]
                made[0].request_stop()
            thread.join(20)
    assert not thread.is_alive() and result == [0]
    assert [(t.name, t.daemon, t.is_alive()) for t in made[0]._threads] == [("esper-sync-watch", True, False)]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.2:{port}/healthz", timeout=2)  # the server stopped too


def test_run_sync_in_the_main_thread_sets_up_logging_and_signals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[KernelSync] = []

    class Idle(KernelSync):
        def run(self) -> None:  # no loops: only the set-up around them is looked at
            made.append(self)

    monkeypatch.setattr(sync_mod, "KernelSync", Idle)
    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr(logging.root, "level", logging.WARNING)
    said: list[str] = []
    monkeypatch.setattr(sync_mod.log, "info", lambda msg, *args: said.append(msg % args))
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    config = SyncConfig(kernel_dir=tmp_path / "vol", kernels=("k",), port=0, host="127.0.0.1")
    try:
        assert sync_mod.run_sync(config, api_client=object()) == 0
        handlers = [signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert logging.root.level == logging.INFO
    [handler] = logging.root.handlers
    assert handler.formatter is not None
    assert handler.formatter._fmt == "%(asctime)s %(levelname)s %(name)s: %(message)s"
    port = int(said[0].rsplit("port ", 1)[1].rstrip(")"))
    assert said == [f"syncing k in namespace default into {tmp_path / 'vol'} (port {port})"]
    made[0].stop()
    for h in handlers:  # SIGTERM and SIGINT ask the sync to stop
        made[0]._stop.clear()
        assert callable(h)
        h(signal.SIGTERM, None)
        assert made[0]._stop.is_set()


def test_reconcile_without_waiting_reports_what_is_installed_now(tmp_path: Path) -> None:
    """An event before the first list installs the Kernel; readiness waits for that first list."""
    obj, _, _ = _ready_kernel(tmp_path, "k", 1)
    sync = _sync(tmp_path, items=[obj])
    try:
        sync.apply_event({"type": "ADDED", "object": obj})
        assert sync.reconcile() is False  # the fetch has started, nothing is installed yet
        _until(lambda: not sync._inflight or all(f.done() for f in sync._inflight.values()), "the fetch")
        assert sync.reconcile() is True and not sync.ready()
        sync.list_kernels()
        assert sync.reconcile() is True and sync.ready()
    finally:
        sync.stop()


def test_what_the_sidecar_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    obj, _, sha = _ready_kernel(tmp_path, "k", 1)
    sync = _sync(tmp_path, items=[obj], workers=1)
    (tmp_path / "vol" / "kernels" / "stray").mkdir()
    try:
        with caplog.at_level(logging.INFO, logger="esper.sidecar.sync"):
            sync.run_once()
            monkeypatch.setattr(
                sync_mod, "write_index", lambda *a: (_ for _ in ()).throw(OSError(28, "disk full"))
            )
            sync.api.items = []  # type: ignore[attr-defined]
            sync.run_once()
        assert [r.getMessage() for r in caplog.records] == [
            "index v1: (empty)",
            "removing stray (no longer wanted)",
            f"installed k ({sha[:12]})",
            "index v2: k",
            "cannot write the index: [Errno 28] disk full",
            "removing k (no longer wanted)",
        ]
    finally:
        sync.stop()


def test_a_kernel_no_longer_wanted_goes_at_once_when_nothing_is_on_its_way(tmp_path: Path) -> None:
    a, _, _ = _ready_kernel(tmp_path, "a", 1)
    b, _, _ = _ready_kernel(tmp_path, "b", 2)
    sync = _sync(tmp_path, items=[a, b], kernels=("a", "b"))
    try:
        assert sync.run_once()
        sync.api.items = [b]  # type: ignore[attr-defined]
        assert sync.run_once()
        assert [e.name for e in read_index(tmp_path / "vol").kernels] == ["b"]
        assert os.listdir(tmp_path / "vol" / "kernels") == ["b"]
    finally:
        sync.stop()


def test_while_one_arrives_the_others_are_still_kept_or_refreshed(tmp_path: Path) -> None:
    """Make-before-break skips only the Kernels no longer wanted: a wanted one's new size is still
    recorded (without fetching it again), and a wanted Kernel's old directory is not removed."""
    a, _, _ = _ready_kernel(tmp_path, "a", 1)
    b, _, _ = _ready_kernel(tmp_path, "b", 2)
    c, _, _ = _ready_kernel(tmp_path, "c", 3)
    store = _Failing(LocalStore(tmp_path / "store"), None)
    sync = _sync(tmp_path, items=[a, b], kernels=("a", "b", "c"), workers=1)
    sync.store_factory = lambda uri: store  # type: ignore[assignment]
    try:
        assert sync.run_once() and store.fetches == 2
        store.error = StorageError("down")
        resized = {**b, "status": {**b["status"], "artifact": {**b["status"]["artifact"], "size": 1}}}
        sync.api.items = [resized, c]  # type: ignore[attr-defined]
        assert sync.run_once() is False  # c cannot arrive yet
        assert store.fetches == 3  # only c was fetched
        index = read_index(tmp_path / "vol")
        assert [(e.name, e.size) for e in index.kernels] == [("a", a["status"]["artifact"]["size"]), ("b", 1)]
        v2, _, _ = _ready_kernel(tmp_path, "b", 4)  # b now names another bundle, which cannot arrive either
        sync.api.items = [v2, c]  # type: ignore[attr-defined]
        sync.run_once()
        assert sorted(os.listdir(tmp_path / "vol" / "kernels")) == ["a", "b"]  # b's directory is kept for it
    finally:
        sync.stop()


def test_a_failed_fetch_is_retried_when_due_without_any_event(tmp_path: Path) -> None:
    obj, _, _ = _ready_kernel(tmp_path, "k", 1)
    store = _Failing(LocalStore(tmp_path / "store"), StorageError("down"))
    sync = _sync(tmp_path, retry_base=0.05, retry_max=0.05)
    sync.store_factory = lambda uri: store  # type: ignore[assignment]

    class Silent(FakeApi):  # lists once; its watches never send an event
        def list_namespaced_custom_object(self, *args: Any, watch: bool = False, **kwargs: Any) -> Any:
            if not watch:
                return super().list_namespaced_custom_object(*args, **kwargs)
            time.sleep(0.05)
            return _WatchResponse([])

    sync.api = Silent([obj])  # type: ignore[assignment]
    try:
        sync.start()
        _until(lambda: store.fetches >= 1, "the first fetch", seconds=5)
        store.error = None
        _until(lambda: read_index(tmp_path / "vol").get("k") is not None, "the retry", seconds=5)
    finally:
        sync.stop()


def test_one_pass_starts_every_fetch_that_is_due(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed Kernel or one waiting out its backoff does not hold back the ones after it; a
    retry is due at its time exactly."""
    k, _, _ = _ready_kernel(tmp_path, "k", 1)
    l_, _, _ = _ready_kernel(tmp_path, "l", 2)
    m, _, _ = _ready_kernel(tmp_path, "m", 3)
    store = _Failing(LocalStore(tmp_path / "store"), None)
    sync = _sync(tmp_path, items=[k], kernels=("k", "l", "m", "n"), workers=1)
    sync.store_factory = lambda uri: store  # type: ignore[assignment]
    try:
        assert sync.run_once()
        sync.api.items = [k, l_]  # type: ignore[attr-defined]
        assert sync.run_once() and store.fetches == 2  # k is installed: l is fetched all the same
        store.error = StorageError("down")
        sync.api.items = [k, l_, m]  # type: ignore[attr-defined]
        sync.run_once()
        store.error = None
        sync._failures["m"].next_at = 1e12  # m waits out its backoff; n, after it, is fetched
        n, _, _ = _ready_kernel(tmp_path, "n", 4)
        sync.api.items = [m, n, k, l_]  # type: ignore[attr-defined]
        assert sync.run_once() is False and store.fetches == 4
        assert read_index(tmp_path / "vol").get("n") is not None
        monkeypatch.setattr(sync_mod.time, "monotonic", lambda: 5000.0)
        sync._failures["m"].next_at = 5000.0  # due now, to the tick
        assert sync.run_once() is True and store.fetches == 5
    finally:
        sync.stop()


def test_a_finished_fetch_wakes_the_reconciler(tmp_path: Path) -> None:
    """No watch event and no failure due: the install is recorded because the fetch's end wakes it."""
    obj, _, _ = _ready_kernel(tmp_path, "k", 1)
    sync = _sync(tmp_path)

    class Silent(FakeApi):
        def list_namespaced_custom_object(self, *args: Any, watch: bool = False, **kwargs: Any) -> Any:
            if not watch:
                return super().list_namespaced_custom_object(*args, **kwargs)
            time.sleep(0.05)
            return _WatchResponse([])

    sync.api = Silent([obj])  # type: ignore[assignment]
    try:
        sync.start()
        _until(lambda: read_index(tmp_path / "vol").get("k") is not None, "the install", seconds=5)
    finally:
        sync.stop()


def test_a_fetch_asks_the_store_for_the_recorded_sha256_trusted_keys_and_size_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each is checked by the store; here each one, wrong, refuses the bundle (settled)."""
    good, _, sha = _ready_kernel(tmp_path, "k", 1)
    unsigned_key, _ = make_fake_bundle(tmp_path / "u", seed=5, size=256, signed=False)
    ref = LocalStore(tmp_path / "store").put_bundle(unsigned_key, tmp_path / "u")
    unsigned = _obj("u", unsigned_key, ref.sha256, ref.uri, size=ref.size)
    sync = _sync(tmp_path, kernels=("k", "u"), max_bundle_bytes=1000)  # four 256-byte files and more
    sync.store_factory = lambda uri: LocalStore(tmp_path / "store")  # type: ignore[assignment]
    try:
        d = desired_of(good, "team")
        assert d is not None
        other = Desired(d.entry.model_copy(update={"sha256": C}), d.bundle_uri)
        r = sync._fetch("k", other)
        assert (r.outcome, r.settled) == (
            "artifact_error",
            True,
        ) and f"sha256 is {sha}, expected {C}" in r.error
        du = desired_of(unsigned, "team")
        assert du is not None
        r = sync._fetch("u", du)
        assert r.outcome == "artifact_error" and "unsigned (no manifest.sig)" in r.error
        r = sync._fetch("k", d)
        assert r.outcome == "artifact_error" and "more than the 1000 allowed" in r.error
        samples = sync.metrics.registry.get_sample_value("esper_sync_download_seconds_sum", {})
        assert samples is not None and 0 <= samples < 60  # wall time of the three fetches
        broken = _Failing(LocalStore(tmp_path / "store"), RuntimeError("a bug"))
        sync.store_factory = lambda uri: broken  # type: ignore[assignment]
        sync._stores.clear()
        with caplog.at_level(logging.ERROR, logger="esper.sidecar.sync"):
            r = sync._fetch("k", d)
        assert (r.outcome, r.error, r.settled) == ("error", "RuntimeError('a bug')", False)
        assert [rec.getMessage() for rec in caplog.records] == ["fetching k failed unexpectedly"]
    finally:
        sync.stop()


@pytest.mark.parametrize("change", ["sha256", "key", "unsigned"])
def test_a_restart_drops_an_entry_its_bundle_does_not_match(
    tmp_path: Path, change: str, caplog: pytest.LogCaptureFixture
) -> None:
    obj, _, _ = _ready_kernel(tmp_path, "k", 1)
    first = _sync(tmp_path, items=[obj])
    try:
        first.run_once()
    finally:
        first.stop()
    vol = tmp_path / "vol"
    entry = read_index(vol).kernels[0]
    if change == "unsigned":
        (vol / "kernels" / "k" / "manifest.sig").unlink()
    else:
        write_index(vol, [entry.model_copy(update={change: C})], 5)
    with caplog.at_level(logging.WARNING, logger="esper.sidecar.sync"):
        second = _sync(tmp_path, items=[obj])
    try:
        assert second._installed == {}
        [message] = [r.getMessage() for r in caplog.records]
        why = {"sha256": f"expected {C}", "key": f"expected {C}", "unsigned": "unsigned (no manifest.sig)"}[
            change
        ]
        assert message.startswith("dropping k from the index: ") and why in message
    finally:
        second.stop()


def test_a_corrupt_index_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "index.json").write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="esper.sidecar.sync"):
        sync = _sync(tmp_path)
    sync.stop()
    [message] = [r.getMessage() for r in caplog.records]
    assert message.endswith("; starting from an empty index") and "index.json" in message


def test_the_sync_uses_the_given_client_and_a_named_pool_of_the_configured_size(tmp_path: Path) -> None:
    from kubernetes.client import ApiClient

    client = ApiClient()
    sync = KernelSync(SyncConfig(kernel_dir=tmp_path / "vol", kernels=("k",), workers=2), api_client=client)
    try:
        assert sync.api.api_client is client and sync.ready() is False
        assert sync._pool._max_workers == 2
        names = [sync._pool.submit(lambda: threading.current_thread().name).result() for _ in range(3)]
        assert all(n.startswith("esper-sync-fetch_") for n in names)
    finally:
        sync.stop()


def test_what_is_desired_uses_the_configured_namespace_and_target(tmp_path: Path) -> None:
    sync = _sync(tmp_path, kernels=("bad", "k", "gpu"), targets=("cpu",))
    try:
        bare = _obj("k")
        del bare["metadata"]["namespace"]
        gpu = _obj("gpu")
        gpu["spec"]["target"] = "cuda-sm90"
        for o in (_obj("bad", sha="nope"), bare, gpu):
            sync.apply_event({"type": "ADDED", "object": o})
        desired = sync._desired()
        assert list(desired) == ["k"]  # after a malformed one; not the other target's
        assert desired["k"].entry.namespace == "team"
    finally:
        sync.stop()
    targetless = _obj("k")
    del targetless["spec"]["target"]
    entry = desired_of(targetless, "ns")
    assert entry is not None and entry.entry.target == ""


def test_stop_waits_for_the_running_fetch_cancels_queued_ones_and_bounds_the_wait(tmp_path: Path) -> None:
    a, _, _ = _ready_kernel(tmp_path, "a", 1)
    b, _, _ = _ready_kernel(tmp_path, "b", 2)
    release, fetched = threading.Event(), []

    class Slow(_Failing):
        def fetch_bundle(
            self, key: str, dest_dir: Path, expected_sha256: str | None = None, **kw: Any
        ) -> Path:
            fetched.append(Path(dest_dir).name)
            release.wait(10)
            return super().fetch_bundle(key, dest_dir, expected_sha256, **kw)

    store = Slow(LocalStore(tmp_path / "store"), None)
    sync = _sync(tmp_path, items=[a, b], kernels=("a", "b"), workers=1)
    sync.store_factory = lambda uri: store  # type: ignore[assignment]
    sync.list_kernels()
    sync.reconcile()  # a is fetched, b waits in the queue
    _until(lambda: fetched == ["a"], "the first fetch")
    stuck = threading.Event()
    straggler = threading.Thread(target=lambda: stuck.wait(3))  # a loop that does not end at once
    straggler.start()
    sync._threads.append(straggler)
    stopping = threading.Thread(target=lambda: sync.stop(timeout=0.1))
    t0 = time.monotonic()
    stopping.start()
    stopping.join(0.5)
    assert stopping.is_alive()  # waiting for a's fetch
    release.set()
    stopping.join(10)
    assert not stopping.is_alive() and time.monotonic() - t0 < 2.5  # the straggler was not waited for
    assert fetched == ["a"]  # b's fetch was cancelled, never started
    stuck.set()


def test_the_index_log_lists_every_kernel(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a, _, _ = _ready_kernel(tmp_path, "a", 1)
    b, _, _ = _ready_kernel(tmp_path, "b", 2)
    sync = _sync(tmp_path, items=[b, a], kernels=("a", "b"))
    try:
        with caplog.at_level(logging.INFO, logger="esper.sidecar.sync"):
            assert sync.run_once()
        assert "index v2: a, b" in [r.getMessage() for r in caplog.records]
    finally:
        sync.stop()


def test_without_a_client_one_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes.client import ApiClient

    made = ApiClient()
    monkeypatch.setattr(sync_mod, "make_api_client", lambda: made)
    sync = KernelSync(SyncConfig(kernel_dir=tmp_path / "vol", kernels=("k",)))
    try:
        assert sync.api.api_client is made
    finally:
        sync.stop()
