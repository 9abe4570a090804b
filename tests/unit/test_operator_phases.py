"""A Blueprint's status follows its Kernels' final phases whichever watch event comes last."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import kopf
import pytest

from esper_operator import handlers, metrics

LOG = logging.getLogger("test")


def run(handler: Any, **kwargs: Any) -> None:
    """Call a kopf handler as kopf would (its decorator's type hides the coroutine)."""
    asyncio.run(handler(logger=LOG, **kwargs))


class Refreshes:
    """The reconciler's two refresh entry points, recorded."""

    def __init__(self, fail: bool = False) -> None:
        self.kernels: list[str] = []
        self.blueprints: list[tuple[str, str]] = []
        self.fail = fail

    async def refresh_blueprints(self, kernel: dict[str, Any]) -> None:
        self.kernels.append(kernel["metadata"]["name"])
        if self.fail:
            raise RuntimeError("API down")

    async def refresh_blueprint(self, namespace: str, name: str) -> None:
        self.blueprints.append((namespace, name))
        if self.fail:
            raise RuntimeError("API down")


@pytest.fixture(autouse=True)
def no_phases_seen() -> Iterator[None]:
    metrics._phases.clear()
    yield
    metrics._phases.clear()


def memo(refreshes: Refreshes) -> kopf.Memo:
    m = kopf.Memo()
    m.reconciler = refreshes
    return m


def kernel_event(refreshes: Refreshes, phase: str | None, type_: str = "MODIFIED", name: str = "k1") -> None:
    body = kopf.Body(
        {"metadata": {"name": name, "namespace": "ns"}, "status": {"phase": phase} if phase else {}}
    )
    run(handlers.kernel_phase, type=type_, name=name, namespace="ns", body=body, memo=memo(refreshes))


@pytest.mark.parametrize("final", ["Ready", "Failed"])
def test_a_kernel_turning_final_refreshes_its_blueprints(final: str) -> None:
    refreshes = Refreshes()
    kernel_event(refreshes, None, "ADDED")  # no phase yet reads as Pending
    kernel_event(refreshes, "Compiling")
    assert refreshes.kernels == []  # not final: the reconcile writes these
    kernel_event(refreshes, final)
    assert refreshes.kernels == ["k1"]
    kernel_event(refreshes, final)  # the same phase again (another status write): no news
    assert refreshes.kernels == ["k1"]
    assert metrics._phases[("ns", "k1")] == final


def test_a_kernel_first_seen_final_or_deleted_refreshes_nothing() -> None:
    refreshes = Refreshes()
    kernel_event(refreshes, "Ready", "ADDED")  # an operator start lists every Kernel
    kernel_event(refreshes, None, "DELETED")
    assert refreshes.kernels == [] and ("ns", "k1") not in metrics._phases


def test_a_failed_refresh_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    refreshes = Refreshes(fail=True)
    kernel_event(refreshes, "Compiling", "ADDED")
    kernel_event(refreshes, "Ready")
    assert refreshes.kernels == ["k1"] and "API down" in caplog.text


def status(*phases: tuple[str, str]) -> kopf.Status:
    return kopf.Body(
        {"status": {"kernels": [{"name": name, "phase": phase} for name, phase in phases]}}
    ).status


def test_a_blueprint_status_behind_a_final_kernel_is_refreshed() -> None:
    index = {("ns", "k1"): ["Ready"], ("ns", "k2"): ["Compiling"]}  # kopf's index: key -> values

    def behind(status: kopf.Status, namespace: str = "ns") -> bool:
        return handlers._behind_its_kernels(status=status, namespace=namespace, kernel_phases=index)

    assert behind(status(("k1", "Compiling")))
    assert behind(status(("k2", "Pending"), ("k1", "Failed")))
    assert not behind(status(("k1", "Ready"), ("k2", "Pending")))  # k2 not final: the reconcile writes it
    assert not behind(status(("k3", "Compiling")))  # never listed
    assert not behind(status(("k1", "Compiling")), namespace="other")  # another namespace's k1
    assert not behind(kopf.Body({}).status)
    refreshes = Refreshes()
    run(handlers.check_phases, type="MODIFIED", name="bp", namespace="ns", memo=memo(refreshes))
    run(handlers.check_phases, type="DELETED", name="bp", namespace="ns", memo=memo(refreshes))
    assert refreshes.blueprints == [("ns", "bp")]


def test_the_index_holds_each_kernels_phase() -> None:
    got = asyncio.run(handlers.kernel_phases(namespace="ns", name="k1", body=kopf.Body({})))
    assert got == {("ns", "k1"): "Pending"}
    ready = kopf.Body({"status": {"phase": "Ready"}})
    assert asyncio.run(handlers.kernel_phases(namespace="ns", name="k1", body=ready)) == {
        ("ns", "k1"): "Ready"
    }
