"""Pure parts of the catalogue: compile attempts and back-off, query selectors, rollback specs, ages."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from esper.cli.catalogue import CatalogueError, KernelQuery, parse_age, rollback_patch
from esper_operator.queue import attempt_job_name, backoff_seconds, due, should_retry


def test_attempts_are_named_from_the_first_jobs_name() -> None:
    base = "tezzeret-cpu-0123456789abcdef"
    assert [attempt_job_name(base, n) for n in (1, 2, 11)] == [base, f"{base}-2", f"{base}-11"]
    assert len(attempt_job_name("tezzeret-cuda-sm100a-0123456789abcdef", 20)) <= 63


def test_backoff_doubles_within_bounds_and_is_capped() -> None:
    rand = random.Random(1)
    for failures, full in ((1, 2.0), (2, 4.0), (3, 8.0), (6, 30.0), (40, 30.0)):
        delay = backoff_seconds(failures, 2.0, 30.0, rand)
        assert full / 2 <= delay <= full


def test_only_transient_reasons_are_retried_and_a_user_retry_renews_the_budget() -> None:
    assert should_retry("OOMKilled", {"attempts": 1}, limit=2)
    assert should_retry("Evicted", {"attempts": 2}, limit=2)
    assert not should_retry("Evicted", {"attempts": 3}, limit=2)
    assert not should_retry("ValidationFailed", {"attempts": 1}, limit=2)
    assert not should_retry("OOMKilled", {"attempts": 1}, limit=0)
    assert should_retry("DeadlineExceeded", {"attempts": 4, "retryBase": 3}, limit=1)


def test_due_compares_with_retry_at() -> None:
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert due({}, now) and due({"retryAt": ""}, now)
    assert due({"retryAt": "2026-01-01T11:59:59.500Z"}, now)
    assert not due({"retryAt": "2026-01-01T12:00:00.250Z"}, now)


def test_query_becomes_selectors_and_refuses_bad_input() -> None:
    q = KernelQuery(blueprint="mlp", template="residual-mlp", target="cpu", phase="Ready", selector="team=ml")
    assert q.label_selector() == "team=ml,blueprint.esper.dev/mlp"
    assert q.field_selector() == "spec.template=residual-mlp,spec.target=cpu,status.phase=Ready"
    assert KernelQuery().label_selector() == "" and KernelQuery().field_selector() == ""
    with pytest.raises(CatalogueError, match="--phase must be one of Pending, Compiling, Ready, Failed"):
        KernelQuery(phase="Done")
    with pytest.raises(CatalogueError, match="--min-speedup must be at least 0"):
        KernelQuery(min_speedup=-1)
    with pytest.raises(CatalogueError, match="--selector: invalid label selector"):
        KernelQuery(selector="a in x")
    with pytest.raises(CatalogueError, match="--blueprint, --phase need a cluster"):
        KernelQuery(blueprint="b", phase="Ready").store_only()
    assert KernelQuery(min_speedup=1.5).keeps_speedup(1.5) and not KernelQuery(min_speedup=1.5).keeps_speedup(
        None
    )


def test_rollback_patch_writes_the_kernels_graph_back() -> None:
    graph = {"inputs": [{"name": "x", "shape": ["batch", 4]}], "nodes": [], "outputs": ["x"]}
    spec = {"irDigest": "d", "graph": graph, "compile": {"initSeed": 3}}
    kernels = [{"spec": {**spec, "target": "cpu"}}, {"spec": {**spec, "target": "cuda-sm90"}}]
    patch = rollback_patch({}, kernels)
    assert patch == {"spec": {"template": None, "graph": graph, "targets": ["cpu", "cuda-sm90"],
                              "compile": {"initSeed": 3}}}  # fmt: skip
    with pytest.raises(CatalogueError, match="disagree"):
        rollback_patch({}, [kernels[0], {"spec": {**spec, "irDigest": "e", "target": "cpu"}}])
    with pytest.raises(CatalogueError, match="no Kernels left"):
        rollback_patch({}, [])


def test_ages() -> None:
    assert parse_age("90s") == dt.timedelta(seconds=90) and parse_age("7d") == dt.timedelta(days=7)
    assert parse_age("0s") == dt.timedelta()
    with pytest.raises(CatalogueError, match="such as 6h; got 'soon'"):
        parse_age("soon")
