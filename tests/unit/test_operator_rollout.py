"""Keep-last-good rollouts: which Kernel a Blueprint serves per target, its revisions and history."""

from __future__ import annotations

from esper.contracts.naming import requester_label, serving_selector
from esper_operator.rollout import advance, held


def k(target: str, name: str, phase: str) -> dict[str, str]:
    return {"target": target, "name": name, "phase": phase}


def test_first_revision_serves_each_target_once_ready() -> None:
    r = advance({}, digest="d1", current=[k("cpu", "a", "Compiling")], phases={}, history_limit=3)
    assert (r.revision, r.serving, r.history, r.roles) == (1, [], [], {"a": "candidate"})
    prev = {"revision": 1, "digest": "d1", "kernels": [k("cpu", "a", "Compiling")]}
    r = advance(
        prev, digest="d1", current=[k("cpu", "a", "Ready")], phases={"a": "Compiling"}, history_limit=3
    )
    assert r.revision == 1 and r.serving == [k("cpu", "a", "Ready")] and r.roles == {"a": "serving"}


def test_an_edit_keeps_serving_the_last_ready_kernel_until_the_new_one_is_ready() -> None:
    served = {
        "revision": 1,
        "digest": "d1",
        "kernels": [k("cpu", "a", "Ready")],
        "serving": [k("cpu", "a", "Ready")],
    }
    r = advance(
        served, digest="d2", current=[k("cpu", "b", "Compiling")], phases={"a": "Ready"}, history_limit=3
    )
    assert r.revision == 2
    assert r.serving == [k("cpu", "a", "Ready")]
    assert r.history == [{"revision": 1, "digest": "d1", "kernels": [{"target": "cpu", "name": "a"}]}]
    assert r.roles == {"a": "serving", "b": "candidate"}
    # The new Kernel fails: the old one still serves.
    prev = {
        **served,
        "revision": 2,
        "digest": "d2",
        "kernels": [k("cpu", "b", "Compiling")],
        "history": r.history,
    }
    failed = advance(
        prev,
        digest="d2",
        current=[k("cpu", "b", "Failed")],
        phases={"a": "Ready", "b": "Compiling"},
        history_limit=3,
    )
    assert failed.revision == 2 and failed.serving == [k("cpu", "a", "Ready")]
    # It becomes Ready instead: the Blueprint switches; the old one stays in history (retained).
    ready = advance(
        prev,
        digest="d2",
        current=[k("cpu", "b", "Ready")],
        phases={"a": "Ready", "b": "Compiling"},
        history_limit=3,
    )
    assert ready.serving == [k("cpu", "b", "Ready")] and ready.roles == {"a": "retained", "b": "serving"}


def test_per_target_switch_and_a_dropped_target_stops_serving() -> None:
    prev = {
        "revision": 1, "digest": "d1",
        "kernels": [k("cpu", "a", "Ready"), k("cuda-sm90", "g", "Ready")],
        "serving": [k("cpu", "a", "Ready"), k("cuda-sm90", "g", "Ready")],
    }  # fmt: skip
    r = advance(
        prev,
        digest="d2",
        current=[k("cpu", "b", "Ready")],
        phases={"a": "Ready", "g": "Ready"},
        history_limit=3,
    )
    assert r.serving == [k("cpu", "b", "Ready")]
    assert r.roles == {"a": "retained", "g": "retained", "b": "serving"}


def test_history_is_bounded_and_never_records_a_revision_that_never_served() -> None:
    status: dict = {}
    phases: dict[str, str] = {}
    for i in range(5):
        name = f"n{i}"
        r = advance(status, digest=f"d{i}", current=[k("cpu", name, "Ready")], phases=phases, history_limit=2)
        phases[name] = "Ready"
        status = {"revision": r.revision, "digest": f"d{i}", "kernels": [k("cpu", name, "Ready")],
                  "serving": r.serving, "history": r.history}  # fmt: skip
    assert status["revision"] == 5
    assert [h["revision"] for h in status["history"]] == [4, 3]
    assert held(status) == {"n4", "n3", "n2"}
    # A revision whose Kernel never became Ready is not kept.
    r = advance(
        status,
        digest="x",
        current=[k("cpu", "x", "Compiling")],
        phases={**phases, "n4": "Ready"},
        history_limit=2,
    )
    status2 = {
        "revision": r.revision,
        "digest": "x",
        "kernels": [k("cpu", "x", "Compiling")],
        "serving": r.serving,
        "history": r.history,
    }
    r2 = advance(
        status2,
        digest="y",
        current=[k("cpu", "y", "Compiling")],
        phases={**phases, "x": "Compiling"},
        history_limit=2,
    )
    assert [h["revision"] for h in r2.history] == [5, 4] and "x" not in r2.roles
    assert r2.serving == [k("cpu", "n4", "Ready")]


def test_going_back_to_a_recorded_revision_reuses_its_ready_kernels() -> None:
    prev = {
        "revision": 2, "digest": "d2",
        "kernels": [k("cpu", "b", "Ready")], "serving": [k("cpu", "b", "Ready")],
        "history": [{"revision": 1, "digest": "d1", "kernels": [{"target": "cpu", "name": "a"}]}],
    }  # fmt: skip
    r = advance(
        prev,
        digest="d1",
        current=[k("cpu", "a", "Ready")],
        phases={"a": "Ready", "b": "Ready"},
        history_limit=3,
    )
    assert r.revision == 3 and r.serving == [k("cpu", "a", "Ready")]
    assert r.history == [{"revision": 2, "digest": "d2", "kernels": [{"target": "cpu", "name": "b"}]}]


def test_requester_labels_survive_long_names() -> None:
    long_a, long_b = "a" * 200 + "-one", "a" * 200 + "-two"
    key_a, key_b = requester_label(long_a), requester_label(long_b)
    assert key_a != key_b
    prefix, _, name = key_a.partition("/")
    assert prefix == "blueprint.esper.dev" and len(name) <= 63 and name[0].isalnum() and name[-1].isalnum()
    assert requester_label("mlp") == "blueprint.esper.dev/mlp"
    assert serving_selector("mlp") == "blueprint.esper.dev/mlp=serving"
