"""Esper's CRDs on a real API server: admission with the server's own messages, every CEL rule both
ways, the status subresource, and what kubectl shows (columns, categories, selectable fields,
explain, wait). The emulator does none of this (no schema, no CEL, no OpenAPI), so these tests need
the real server (`real_api`); see tests/support/cluster/realapi.py for where it comes from."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cluster import ApiError, Cluster, wait_for

pytestmark = [pytest.mark.real_api, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_BLUEPRINTS = [
    (path.name, doc)
    for path in sorted((REPO / "examples").glob("*.yaml"))
    for doc in yaml.safe_load_all(path.read_text())
    if doc and doc.get("kind") == "Blueprint"
]
GROUP_VERSION = "esper.dev/v1alpha1"
V2_DISCOVERY = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
BATCH_ERROR = "must be 'batch' or a size from 1 to 65536"


def blueprint(name: str, **spec: Any) -> dict[str, Any]:
    body = {"template": {"name": "residual-mlp", "params": {"features": 16}}, "targets": ["cpu"], **spec}
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "Blueprint",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {k: v for k, v in body.items() if v is not None},
    }


def graph(*shape: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "x", "shape": list(shape)}],
        # Not "y": kubectl reads YAML 1.1, where a bare y is `true`.
        "nodes": [{"id": "out", "op": "relu", "inputs": ["x"]}],
        "outputs": ["out"],
    }


def kernel(name: str, target: str = "cpu", shape: list[Any] | None = None) -> dict[str, Any]:
    key = hashlib.sha256(f"{name}/{target}".encode()).hexdigest()
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "Kernel",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "esper-test"}},
        "spec": {
            "blueprint": "bp",
            "target": target,
            "key": key,
            "irDigest": hashlib.sha256(name.encode()).hexdigest(),
            "graph": graph(*(shape or ["batch", 16])),
            "toolchain": {"torch": "2.13.0", "capability": "cpu-avx2"},
        },
    }


def apply(cluster: Cluster, obj: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """`kubectl apply` with the server's validation unless the test says otherwise; never raises."""
    text = yaml.safe_dump(obj)
    validate = [] if any(a.startswith("--validate") for a in args) else ["--validate=strict"]
    return cluster.kubectl("apply", "-f", "-", *validate, *args, input=text, check=False)


def refused(cluster: Cluster, obj: Any, *args: str) -> list[str]:
    """The server's error lines for an apply that must fail (each `* field: message`, or the one line)."""
    proc = apply(cluster, obj, *args)
    assert proc.returncode != 0, f"admitted, but should not be:\n{proc.stdout}"
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    bullets = [ln[2:] for ln in lines if ln.startswith("* ")]
    return bullets or [re.sub(r'^The \w+ "[^"]*" is invalid: ', "", ln) for ln in lines]


def assert_written_is_kept(written: Any, stored: Any, where: str = "spec") -> None:
    """Every field written is stored as written; the server may only add (defaults)."""
    if isinstance(written, dict):
        assert isinstance(stored, dict), where
        for key, value in written.items():
            assert key in stored, f"{where}.{key} was dropped"
            assert_written_is_kept(value, stored[key], f"{where}.{key}")
    else:
        assert written == stored, where


def create_error(cluster: Cluster, obj: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as info:
        cluster.create(obj)
    assert info.value.status == 422, info.value.body
    return info.value


def causes(error: ApiError) -> list[tuple[str, str]]:
    return [(c.get("field", ""), c.get("message", "")) for c in error.body["details"]["causes"]]


# ---- admission --------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "doc"), EXAMPLE_BLUEPRINTS, ids=[n for n, _ in EXAMPLE_BLUEPRINTS])
def test_every_example_blueprint_is_admitted_as_written(
    real_cluster: Cluster, source: str, doc: dict
) -> None:
    proc = apply(real_cluster, doc)
    assert proc.returncode == 0, proc.stderr
    stored = real_cluster.get(
        "blueprints", doc["metadata"]["name"], doc["metadata"].get("namespace", "default")
    )
    assert stored is not None
    assert_written_is_kept(doc["spec"], stored["spec"])
    assert stored["spec"]["targets"] == doc["spec"].get("targets", ["cpu"])


def test_template_and_graph_together_are_refused(real_cluster: Cluster) -> None:
    errors = refused(real_cluster, blueprint("both", graph=graph("batch", 16)))
    assert errors == ["spec: Invalid value: give exactly one of template or graph"]


def test_neither_template_nor_graph_is_refused(real_cluster: Cluster) -> None:
    errors = refused(real_cluster, blueprint("neither", template=None))
    assert errors == ["spec: Invalid value: give exactly one of template or graph"]


def test_a_graph_alone_passes_the_one_of_rule(real_cluster: Cluster) -> None:
    proc = apply(real_cluster, blueprint("graph-only", template=None, graph=graph("batch", 16)))
    assert proc.returncode == 0, proc.stderr


def test_omitted_targets_default_to_cpu_as_in_the_model(real_cluster: Cluster) -> None:
    from esper.contracts.blueprint import BlueprintSpec

    model_default = BlueprintSpec(template={"name": "residual-mlp"}).targets
    created = real_cluster.create(blueprint("no-targets", targets=None))
    assert created["spec"]["targets"] == model_default == ["cpu"]


def test_empty_targets_give_one_error(real_cluster: Cluster) -> None:
    error = create_error(real_cluster, blueprint("empty-targets", targets=[]))
    assert causes(error) == [
        ("spec.targets", "Invalid value: 0: spec.targets in body should have at least 1 items")
    ]


def test_duplicate_targets_give_one_error(real_cluster: Cluster) -> None:
    error = create_error(real_cluster, blueprint("dup-targets", targets=["cpu", "cuda-sm90", "cpu"]))
    assert causes(error) == [("spec.targets[2]", 'Duplicate value: "cpu"')]


def test_unknown_target_is_refused_by_its_pattern(real_cluster: Cluster) -> None:
    errors = refused(real_cluster, blueprint("tpu", targets=["cpu", "tpu-v5"]))
    assert len(errors) == 1
    assert errors[0].startswith(
        'spec.targets[1]: Invalid value: "tpu-v5": spec.targets[1] in body should match'
    )
    assert "^(cpu|cpu-avx512|cuda-sm[0-9]{2,3}a?)$" in errors[0]


def test_the_avx512_target_is_admitted_and_its_near_misses_are_not(real_cluster: Cluster) -> None:
    created = real_cluster.create(blueprint("avx512", targets=["cpu", "cpu-avx512"]))
    assert created["spec"]["targets"] == ["cpu", "cpu-avx512"]
    for i, bad in enumerate(("cpu-avx2", "cpu-avx512f", "cpu-AVX512")):
        errors = refused(real_cluster, blueprint(f"near-{i}", targets=[bad]))
        assert len(errors) == 1 and errors[0].startswith(f'spec.targets[0]: Invalid value: "{bad}"'), errors


def test_bad_shape_is_refused_with_one_message_per_mistake(real_cluster: Cluster) -> None:
    errors = refused(real_cluster, blueprint("shapes", template=None, graph=graph(64, "batch", 0, -3)))
    assert sorted(errors) == sorted(
        [
            "spec.graph.inputs[0].shape: Invalid value: the first dimension must be 'batch'",
            f"spec.graph.inputs[0].shape[2]: Invalid value: 0: {BATCH_ERROR}",
            f"spec.graph.inputs[0].shape[3]: Invalid value: -3: {BATCH_ERROR}",
        ]
    ), errors


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (["batch", 1], []),
        (["batch", 65536, 3], []),
        (["batch", 65537], [("spec.graph.inputs[0].shape[1]", f"Invalid value: 65537: {BATCH_ERROR}")]),
        (["batch", "width"], [("spec.graph.inputs[0].shape[1]", f'Invalid value: "width": {BATCH_ERROR}')]),
        (
            [16, 32],
            [("spec.graph.inputs[0].shape", "Invalid value: the first dimension must be 'batch'")],
        ),
        (
            ["batch", 8, "batch"],
            [
                (
                    "spec.graph.inputs[0].shape",
                    "Invalid value: 'batch' may only be the first dimension",
                )
            ],
        ),
    ],
    ids=["smallest-size", "largest-size", "too-large", "other-word", "no-batch", "batch-twice"],
)
def test_shape_rules_each_way(
    real_cluster: Cluster, shape: list[Any], expected: list[tuple[str, str]]
) -> None:
    obj = blueprint("shape-" + hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:8], template=None)
    obj["spec"]["graph"] = graph(*shape)
    if not expected:
        assert real_cluster.create(obj)["spec"]["graph"]["inputs"][0]["shape"] == shape
    else:
        assert causes(create_error(real_cluster, obj)) == expected


def test_unknown_fields_are_refused_under_strict_validation(real_cluster: Cluster) -> None:
    obj = blueprint("strict")
    obj["spec"]["compile"] = {"maxBatch": 64, "fastMath": True}
    obj["spec"]["colour"] = "blue"
    errors = " ".join(refused(real_cluster, obj))
    assert 'unknown field "spec.colour"' in errors
    assert 'unknown field "spec.compile.fastMath"' in errors
    assert real_cluster.get("blueprints", "strict") is None


def test_unknown_fields_are_pruned_without_validation(real_cluster: Cluster) -> None:
    obj = blueprint("pruned")
    obj["spec"]["compile"] = {"maxBatch": 64, "fastMath": True}
    obj["spec"]["colour"] = "blue"
    proc = apply(real_cluster, obj, "--validate=false")
    assert proc.returncode == 0, proc.stderr
    spec = real_cluster.get("blueprints", "pruned")["spec"]
    assert "colour" not in spec and "fastMath" not in spec["compile"]
    assert spec["compile"]["maxBatch"] == 64


def test_unknown_fields_are_warned_about_under_warn_validation(real_cluster: Cluster) -> None:
    obj = blueprint("warned")
    obj["spec"]["colour"] = "blue"
    proc = apply(real_cluster, obj, "--validate=warn")
    assert proc.returncode == 0, proc.stderr
    # The server's Warning header reaches kubectl through the routing front.
    assert 'Warning: unknown field "spec.colour"' in proc.stderr
    assert "colour" not in real_cluster.get("blueprints", "warned")["spec"]


# ---- Kernels: immutability and the shape rules ---------------------------------------------------


def test_kernel_spec_is_immutable_but_its_metadata_is_not(real_cluster: Cluster) -> None:
    real_cluster.create(kernel("k-immutable"))
    relabelled = real_cluster.patch("kernels", "k-immutable", {"metadata": {"labels": {"app": "other"}}})
    assert relabelled["metadata"]["labels"]["app"] == "other"  # self == oldSelf holds: admitted
    with pytest.raises(ApiError) as info:
        real_cluster.patch("kernels", "k-immutable", {"spec": {"target": "cuda-sm90"}})
    assert info.value.status == 422
    assert causes(info.value) == [("spec", "Invalid value: Kernel spec is immutable")]
    assert real_cluster.get("kernels", "k-immutable")["spec"]["target"] == "cpu"


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (["batch", 0], ("spec.graph.inputs[0].shape[1]", f"Invalid value: 0: {BATCH_ERROR}")),
        ([8, 16], ("spec.graph.inputs[0].shape", "Invalid value: the first dimension must be 'batch'")),
        (
            ["batch", "batch"],
            ("spec.graph.inputs[0].shape", "Invalid value: 'batch' may only be the first dimension"),
        ),
    ],
    ids=["zero-size", "no-batch", "batch-twice"],
)
def test_kernel_shapes_follow_the_same_rules(
    real_cluster: Cluster, shape: list[Any], expected: tuple
) -> None:
    error = create_error(real_cluster, kernel("k-bad-shape", shape=shape))
    assert causes(error) == [expected]


# ---- the status subresource ----------------------------------------------------------------------


def test_status_is_ignored_on_create_and_on_spec_writes(real_cluster: Cluster) -> None:
    obj = blueprint("status-sub")
    obj["status"] = {"phase": "Ready", "kernelsSummary": "9/9"}
    created = real_cluster.create(obj)
    assert "status" not in created or created["status"].get("phase") != "Ready"
    assert created["metadata"]["generation"] == 1

    with_status = real_cluster.patch("blueprints", "status-sub", {"status": {"phase": "Compiling"}})
    assert (with_status.get("status") or {}).get("phase") != "Compiling"
    assert with_status["metadata"]["generation"] == 1  # nothing changed in spec

    written = real_cluster.patch("blueprints", "status-sub", {"status": {"phase": "Compiling"}}, status=True)
    assert written["status"]["phase"] == "Compiling"
    assert written["metadata"]["generation"] == 1  # status writes never bump it

    # Spec through /status is ignored, as status through the main resource is.
    ignored = real_cluster.patch(
        "blueprints", "status-sub", {"spec": {"targets": ["cuda-sm90"]}}, status=True
    )
    assert ignored["spec"]["targets"] == ["cpu"] and ignored["metadata"]["generation"] == 1


def test_generation_moves_on_spec_changes_only(real_cluster: Cluster) -> None:
    real_cluster.create(blueprint("generation"))
    labelled = real_cluster.patch("blueprints", "generation", {"metadata": {"labels": {"team": "a"}}})
    assert labelled["metadata"]["generation"] == 1
    changed = real_cluster.patch("blueprints", "generation", {"spec": {"targets": ["cpu", "cuda-sm90"]}})
    assert changed["metadata"]["generation"] == 2


# ---- kubectl -----------------------------------------------------------------------------------


def _ready_kernel(cluster: Cluster, name: str, target: str) -> None:
    cluster.create(kernel(name, target))
    status = {
        "phase": "Ready",
        "requesters": [{"blueprint": "bp", "role": "serving"}],
        "requestedBy": "bp",
        "artifact": {"uri": f"s3://b/kernels/{name}", "sha256": "a" * 64, "size": 4096},
        "report": {
            "tolerance": 1e-4,
            "maxAbsError": 0.0,
            "eagerMicros": 10,
            "compiledMicros": 5,
            "speedup": 2.0,
        },
    }
    cluster.patch("kernels", name, {"status": status}, status=True)


def table(cluster: Cluster, *args: str) -> list[list[str]]:
    return [line.split() for line in cluster.kubectl("get", *args).stdout.splitlines()]


def test_kubectl_get_shows_the_printer_columns_and_wide_adds_the_rest(real_cluster: Cluster) -> None:
    _ready_kernel(real_cluster, "k-cols", "cpu")
    rows = table(real_cluster, "kernels")
    assert rows[0] == ["NAME", "BLUEPRINT", "TARGET", "PHASE", "SPEEDUP", "AGE"]
    assert rows[1][:5] == ["k-cols", "bp", "cpu", "Ready", "2"]
    wide = table(real_cluster, "kernels", "-o", "wide")
    assert wide[0] == [
        "NAME", "BLUEPRINT", "TARGET", "PHASE", "SPEEDUP", "AGE", "TEMPLATE", "REASON", "SIZE", "KEY",
    ]  # fmt: skip
    assert wide[1][-2:] == ["4096", kernel("k-cols")["spec"]["key"]]

    real_cluster.create(blueprint("bp-cols"))
    assert table(real_cluster, "bp")[0] == ["NAME", "PHASE", "KERNELS", "SERVING", "TEMPLATE", "AGE"]
    assert table(real_cluster, "bp", "-o", "wide")[0] == [
        "NAME", "PHASE", "KERNELS", "SERVING", "TEMPLATE", "AGE", "REVISION", "DIGEST",
    ]  # fmt: skip


def test_kubectl_get_esper_lists_both_kinds(real_cluster: Cluster) -> None:
    real_cluster.create(blueprint("bp-cat"))
    real_cluster.create(kernel("k-cat"))
    names = {row[0] for row in table(real_cluster, "esper", "-o", "name") for row in [row]}
    assert names == {"blueprint.esper.dev/bp-cat", "kernel.esper.dev/k-cat"}


def test_field_selector_on_target(real_cluster: Cluster) -> None:
    real_cluster.create(kernel("k-cpu", "cpu"))
    real_cluster.create(kernel("k-gpu", "cuda-sm90"))
    out = real_cluster.kubectl("get", "kernels", "--field-selector", "spec.target=cpu", "-o", "name").stdout
    assert out.split() == ["kernel.esper.dev/k-cpu"]
    unsupported = real_cluster.kubectl("get", "kernels", "--field-selector", "spec.key=x", check=False)
    assert unsupported.returncode != 0 and "field label not supported: spec.key" in unsupported.stderr


def test_kubectl_explain_reads_the_schema(real_cluster: Cluster) -> None:
    from esper.contracts.common import CompileOptions

    out = " ".join(real_cluster.kubectl("explain", "blueprint.spec.compile").stdout.split())
    assert "FIELD: compile <Object>" in out and "DESCRIPTION: Compile options." in out
    for name, info in CompileOptions.model_fields.items():
        assert f"{name} <" in out and (info.description or "") in out, name


def test_kubectl_wait_for_ready_sees_a_current_condition_only(real_cluster: Cluster) -> None:
    real_cluster.create(blueprint("wait-ready"))
    real_cluster.patch(
        "blueprints", "wait-ready", {"spec": {"targets": ["cpu", "cuda-sm90"]}}
    )  # generation 2
    stale = {
        "type": "Ready",
        "status": "True",
        "reason": "Ready",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    stale["observedGeneration"] = 1
    real_cluster.patch("blueprints", "wait-ready", {"status": {"conditions": [stale]}}, status=True)
    waited = real_cluster.kubectl(
        "wait", "--for=condition=Ready", "blueprint/wait-ready", "--timeout=1s", check=False
    )
    assert waited.returncode != 0  # a condition about generation 1 says nothing about generation 2
    current = dict(stale, observedGeneration=2)
    real_cluster.patch("blueprints", "wait-ready", {"status": {"conditions": [current]}}, status=True)
    out = real_cluster.kubectl(
        "wait", "--for=condition=Ready", "blueprint/wait-ready", "--timeout=10s"
    ).stdout
    assert out.strip() == "blueprint.esper.dev/wait-ready condition met"


# ---- the hybrid cluster itself ------------------------------------------------------------------


def test_one_endpoint_merges_discovery_from_both_backends(real_cluster: Cluster) -> None:
    if real_cluster.backend != "hybrid":
        pytest.skip("only the hybrid cluster has a routing front")
    out = real_cluster.kubectl("api-resources", "--no-headers").stdout
    names = {line.split()[0] for line in out.splitlines()}
    assert {"blueprints", "kernels", "customresourcedefinitions", "jobs", "pods", "events"} <= names
    # Aggregated discovery (kubectl's first choice): the real server's groups and the emulator's.
    assert real_cluster.rest is not None
    rsp = real_cluster.rest.http.request("GET", real_cluster.url + "/apis", headers={"Accept": V2_DISCOVERY})
    params = dict(p.strip().partition("=")[::2] for p in rsp.headers["Content-Type"].split(";")[1:])
    assert {"g": "apidiscovery.k8s.io", "v": "v2", "as": "APIGroupDiscoveryList"}.items() <= params.items()
    resources = {
        (item["metadata"]["name"], res["resource"])
        for item in json.loads(rsp.data)["items"]
        for version in item["versions"]
        for res in version["resources"]
    }
    assert {
        ("esper.dev", "blueprints"),
        ("batch", "jobs"),
        ("apiextensions.k8s.io", "customresourcedefinitions"),
    } <= resources
    legacy = real_cluster.rest.request("GET", "/apis")  # the legacy form, merged too
    groups = [g["name"] for g in legacy["groups"]]
    assert "esper.dev" in groups and "batch" in groups and len(groups) == len(set(groups))


def _owner(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"], "uid": meta["uid"]}


def test_harness_garbage_collects_across_both_backends(real_cluster: Cluster) -> None:
    first = real_cluster.create(blueprint("gc-first"))
    second = real_cluster.create(blueprint("gc-second"))
    shared = kernel("k-shared")
    shared["metadata"]["ownerReferences"] = [_owner(first), _owner(second)]
    only = kernel("k-only")
    only["metadata"]["ownerReferences"] = [_owner(first)]
    only = real_cluster.create(only)
    real_cluster.create(shared)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "compile-k-only", "namespace": "default", "ownerReferences": [_owner(only)]},
        "spec": {
            "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}
        },
    }
    real_cluster.create(job)

    real_cluster.delete("blueprints", "gc-first")
    # The dependent left without owners goes, and with it its Job on the other backend; the shared
    # one stays, owned by the survivor only.
    wait_for(
        lambda: (
            real_cluster.get("kernels", "k-only") is None
            and real_cluster.get("jobs", "compile-k-only") is None
        ),
        10,
        message="k-only and its Job collected",
    )
    remaining = real_cluster.get("kernels", "k-shared")["metadata"]["ownerReferences"]
    assert [o["uid"] for o in remaining] == [second["metadata"]["uid"]]
