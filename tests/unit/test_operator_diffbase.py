"""Where kopf's last-handled configuration lives: the Blueprint's status, read from the old annotation."""

from __future__ import annotations

import json
from typing import Any

import kopf

from esper_operator.handlers import BlueprintDiffBase

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
