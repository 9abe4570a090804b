"""Bodies the operator cannot walk safely, crash points, and the watch liveness probe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from esper_operator.bodies import BodyRefused, plain
from esper_operator.faults import POINTS, _armed

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'operator'}"}


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"k": value}
    return value


def body(spec: object, status: object | None = None) -> dict:
    return {
        "apiVersion": "esper.dev/v1alpha1",
        "kind": "Blueprint",
        "metadata": {
            "name": "bp",
            "namespace": "default",
            "uid": "u1",
            "managedFields": [{"fieldsV1": nested(2000)}],
        },
        "spec": spec,
        "status": status or {"phase": "Ready", "kernels": [{"name": "cpu-1"}]},
    }


def test_a_plain_body_is_a_deep_copy_without_managed_fields() -> None:
    source = body({"template": {"name": "residual-mlp", "params": {"dims": [1, 2]}}})
    copy = plain(source)
    assert copy["spec"] == source["spec"] and copy["spec"] is not source["spec"]
    assert copy["spec"]["template"]["params"]["dims"] is not source["spec"]["template"]["params"]["dims"]
    assert "managedFields" not in copy["metadata"] and copy["metadata"]["uid"] == "u1"


def test_a_deep_spec_is_refused_with_its_path_and_the_limit() -> None:
    with pytest.raises(BodyRefused) as exc:
        plain(body({"template": {"params": {"x": nested(500)}}}))
    assert str(exc.value) == "spec.template.params.x.k.k.k.k.k... (65 levels): nested deeper than 64 levels"


def test_too_many_values_and_non_finite_numbers_are_refused() -> None:
    with pytest.raises(BodyRefused, match=r"^spec.params.big: more than 100,000 values$"):
        plain(body({"params": {"big": [0] * 100_001}}))
    with pytest.raises(BodyRefused, match=r"^status.x\[1\]: nan is not allowed"):
        plain(body({}, status={"x": [1.0, float("nan")]}))


def test_deletion_needs_only_metadata_and_status() -> None:
    copy = plain(body({"params": nested(5000)}), parts=("status",))
    assert copy["spec"] == {} and copy["status"]["kernels"] == [{"name": "cpu-1"}]


def test_the_operator_process_survives_the_deepest_body_an_api_server_sends() -> None:
    """10,000 levels (Go's JSON limit): decoded, deep-copied, diffed and encoded, in a worker thread too."""
    script = textwrap.dedent(
        """
        import copy, json, threading
        import esper_operator.handlers  # noqa: F401  (sets the limits, as `kopf run` imports it)
        text = '{"a":' * 10_000 + '1' + '}' * 10_000
        def work(out):
            out.append(json.dumps(copy.deepcopy(json.loads(text))) == text.replace(':', ': '))
        out = []
        work(out)
        t = threading.Thread(target=work, args=(out,)); t.start(); t.join()
        print(out)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[True, True]"


def test_crash_points_kill_the_process_only_when_armed() -> None:
    script = "from esper_operator.faults import crash_point\ncrash_point('plan')\nprint('alive')"
    run = [sys.executable, "-c", script]
    armed = subprocess.run(run, env={**ENV, "ESPER_FAULT_POINTS": "job-created, plan"}, capture_output=True)
    assert armed.returncode == -signal.SIGKILL and armed.stdout == b""
    assert b"esper fault point plan: SIGKILL" in armed.stderr
    other = subprocess.run(run, env={**ENV, "ESPER_FAULT_POINTS": "job-created"}, capture_output=True)
    assert other.returncode == 0 and other.stdout == b"alive\n"


def test_unknown_crash_points_are_refused() -> None:
    assert _armed("") == frozenset() and _armed(" plan ,kernel-created") == {"plan", "kernel-created"}
    with pytest.raises(ValueError, match=r"ESPER_FAULT_POINTS: unknown fault point\(s\) plna; known: plan,"):
        _armed("plna")
    assert len(POINTS) >= 10


def test_liveness_fails_once_a_watch_has_stopped() -> None:
    from esper_operator.handlers import Watches

    watches = Watches()
    names = ["watcher for blueprints.v1alpha1.esper.dev@None", "watcher for jobs.v1.batch@None", "other"]
    assert watches.check(names) == ["blueprints.v1alpha1.esper.dev", "jobs.v1.batch"]
    assert watches.check(names[:2]) == ["blueprints.v1alpha1.esper.dev", "jobs.v1.batch"]
    with pytest.raises(RuntimeError, match=r"^the watch of blueprints.v1alpha1.esper.dev has stopped"):
        watches.check(names[1:])


@pytest.mark.parametrize(
    ("status", "annotations", "waits"),
    [
        ({"phase": "Pending", "reason": "Queued"}, {}, True),
        ({"phase": "Pending", "reason": "RetryBackoff"}, {}, True),
        ({"phase": "Pending", "reason": "RetryRequested"}, {}, True),
        ({"phase": "Pending", "reason": "JobCreated"}, {}, False),
        ({"phase": "Compiling", "reason": "Queued"}, {}, False),
        ({"phase": "Ready"}, {"esper.dev/retry": "t1"}, False),
        ({"phase": "Failed"}, {}, False),
        ({"phase": "Failed"}, {"esper.dev/retry": "t1"}, True),
        ({"phase": "Failed", "retryToken": "t1"}, {"esper.dev/retry": "t1"}, False),
        ({"phase": "Failed", "retryToken": "t1"}, {"esper.dev/retry": "t2"}, True),
        ({}, {}, False),
    ],
)
def test_the_queue_timer_runs_only_for_kernels_that_wait_for_a_job(
    status: dict[str, str], annotations: dict[str, str], waits: bool
) -> None:
    from esper_operator.handlers import _waits_for_a_job

    assert _waits_for_a_job(status=status, annotations=annotations) is waits
