"""What kopf keeps on Esper's objects: the diff base in the Blueprint's status, progress while it matters."""

from __future__ import annotations

import json
from typing import Any

import kopf

from esper_operator.handlers import BlueprintDiffBase, ProgressAnnotations

LEGACY = "esper.dev/last-handled-configuration"


def blueprint(annotations: dict[str, str] | None = None, status: dict[str, Any] | None = None) -> kopf.Body:
    raw = {
        "apiVersion": "esper.dev/v1alpha1",
        "kind": "Blueprint",
        "metadata": {"name": "mlp", "namespace": "default", "uid": "u1", "labels": {"team": "a"},
                     "annotations": annotations or {}},
        "spec": {"template": {"name": "residual-mlp"}, "targets": ["cpu"]},
        "status": status or {},
    }  # fmt: skip
    return kopf.Body(raw)


def stored(storage: BlueprintDiffBase, body: kopf.Body) -> kopf.Patch:
    patch = kopf.Patch()
    storage.store(body=body, patch=patch, essence=storage.build(body=body))
    return patch


def test_the_essence_goes_into_the_status_and_no_annotation_is_written() -> None:
    storage = BlueprintDiffBase()
    patch = stored(storage, blueprint())
    expected = {"spec": {"template": {"name": "residual-mlp"}, "targets": ["cpu"]},
                "metadata": {"labels": {"team": "a"}}}  # fmt: skip
    assert json.loads(patch["status"]["operatorState"]["lastHandledConfiguration"]) == expected
    assert "metadata" not in patch  # one status patch, no write of the object itself


def test_it_is_read_back_from_the_status() -> None:
    storage = BlueprintDiffBase()
    essence = {"spec": {"targets": ["cuda-sm90"]}}
    body = blueprint(status={"operatorState": {"lastHandledConfiguration": json.dumps(essence)}})
    assert storage.fetch(body=body) == essence


def test_an_earlier_operators_annotation_is_read_then_moved_into_the_status() -> None:
    storage = BlueprintDiffBase()
    old = {"spec": {"targets": ["cpu"]}}
    body = blueprint(annotations={LEGACY: json.dumps(old) + "\n", "team.example/owner": "x"})
    assert storage.fetch(body=body) == old
    patch = stored(storage, body)
    assert patch["metadata"]["annotations"] == {LEGACY: None}
    moved = json.loads(patch["status"]["operatorState"]["lastHandledConfiguration"])
    assert moved["metadata"]["annotations"] == {"team.example/owner": "x"}  # the old record is no change


def test_the_status_wins_over_a_stale_annotation() -> None:
    storage = BlueprintDiffBase()
    current = {"spec": {"targets": ["cpu", "cuda-sm90"]}}
    body = blueprint(
        annotations={LEGACY: json.dumps({"spec": {"targets": ["cpu"]}})},
        status={"operatorState": {"lastHandledConfiguration": json.dumps(current)}},
    )
    assert storage.fetch(body=body) == current


def test_nothing_is_stored_on_kernels() -> None:
    storage = BlueprintDiffBase()
    raw = dict(blueprint())
    kernel = kopf.Body({**raw, "kind": "Kernel"})
    assert stored(storage, kernel) == {}
    assert storage.fetch(body=kernel) is None


MARKER = "esper.dev/kopf-managed"
RECORD = {"started": "2026-11-26T07:00:00.000000+00:00", "success": True}
RECONCILE, RELEASE = kopf.HandlerId("reconcile"), kopf.HandlerId("release")


def progress() -> ProgressAnnotations:
    return ProgressAnnotations(prefix="esper.dev")


def test_a_handler_done_at_once_leaves_no_progress_and_no_marker_to_write() -> None:
    storage, body, patch = progress(), blueprint(), kopf.Patch()
    storage.store(key=RECONCILE, record=RECORD, body=body, patch=patch)  # kopf: every outcome
    assert patch["metadata"]["annotations"][MARKER] == "yes"
    storage.purge(key=RECONCILE, body=body, patch=patch)  # kopf: all handlers done, same patch
    assert dict(patch) == {}  # nothing to write


def test_a_retried_handlers_record_stays_with_the_marker() -> None:
    storage, body, patch = progress(), blueprint(), kopf.Patch()
    storage.store(key=RECONCILE, record={**RECORD, "success": False, "retries": 1}, body=body, patch=patch)
    storage.store(key=RELEASE, record=RECORD, body=body, patch=patch)
    storage.purge(key=RELEASE, body=body, patch=patch)
    annotations = patch["metadata"]["annotations"]
    assert set(annotations) == {MARKER, "esper.dev/reconcile"}
    assert json.loads(annotations["esper.dev/reconcile"])["retries"] == 1


def test_a_stored_record_is_deleted_and_the_existing_marker_left_alone() -> None:
    storage, patch = progress(), kopf.Patch()
    body = blueprint(annotations={MARKER: "yes", "esper.dev/reconcile": json.dumps(RECORD)})
    storage.store(key=RECONCILE, record=RECORD, body=body, patch=patch)
    storage.purge(key=RECONCILE, body=body, patch=patch)
    assert patch["metadata"]["annotations"] == {"esper.dev/reconcile": None}


def test_other_annotations_in_the_patch_are_kept() -> None:
    storage, body, patch = progress(), blueprint(), kopf.Patch()
    patch.metadata.annotations["team.example/owner"] = "x"
    storage.store(key=RECONCILE, record=RECORD, body=body, patch=patch)
    storage.purge(key=RECONCILE, body=body, patch=patch)
    assert dict(patch) == {"metadata": {"annotations": {"team.example/owner": "x"}}}
