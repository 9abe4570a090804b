"""The Reconciler against an in-memory API server (tests.support.fake_kube) and a local store: what a
user sees on Blueprints, Kernels, compile Jobs and Events at each step (tests/integration/ runs the
same code under a real `kopf run`).

Expected objects are written out by hand from the documented contract (names, labels, status fields),
not derived from the code under test; the kernel key comes from the planner, which has its own tests.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from esper.contracts.job import REQUEST_ENV, CompileRequest
from esper_operator.config import OperatorConfig
from esper_operator.kube import Body, Conflict
from esper_operator.plan import plan_blueprint
from esper_operator.reconcile import Reconciler, finished
from esper_operator.requesters import requester_label
from tests.support.fake_kube import FakeKube, Write, merge_patch

NS, COMPILE_NS = "team", "esper"


def mlp(hidden: int, **extra: Any) -> dict[str, Any]:
    """A small residual MLP's spec: each `hidden` is another revision, another Kernel."""
    return {
        "template": {"name": "residual-mlp", "params": {"features": 16, "hidden": hidden}},
        "targets": ["cpu"],
        **extra,
    }


SPEC, SPEC_2 = mlp(32), mlp(48)
GRAPH_SPEC: dict[str, Any] = {
    "graph": {
        "inputs": [{"name": "x", "shape": ["batch", 8]}],
        "nodes": [{"id": "fc", "op": "linear", "inputs": ["x"], "params": {"outFeatures": 8}}],
        "outputs": ["fc"],
    },
    "targets": ["cpu"],
}
TOOLCHAIN = {"torch": "2.13.0", "capability": "cpu-avx2", "python": "3.11.7"}
REPORT = {
    "tolerance": 1e-4,
    "maxAbsError": 1e-6,
    "eagerMicros": 300.0,
    "compiledMicros": 120.0,
    "speedup": 2.5,
}
STARTED, COMPLETED = "2026-11-26T10:00:00Z", "2026-11-26T10:00:42Z"  # a 42 s Job


def key_of(spec: dict[str, Any], name: str = "mlp") -> str:
    return plan_blueprint(name, spec, torch_version="2.13.0").kernels[0].spec.key


def digest_of(spec: dict[str, Any]) -> str:
    return plan_blueprint("x", spec, torch_version="2.13.0").digest


def kernel_name(spec: dict[str, Any]) -> str:
    return "cpu-" + key_of(spec)[:16]


class World:
    """A cluster (FakeKube), a local store in tmp_path, and a Reconciler whose Events are recorded."""

    def __init__(self, tmp_path: Path, **config: Any) -> None:
        self.kube = FakeKube()
        self.store_dir = tmp_path / "store"
        self.config = OperatorConfig(
            store_uri=self.store_dir.as_uri(), compile_namespace=COMPILE_NS, **config
        )
        self.events: list[tuple[str, str, str, str, str]] = []  # (kind, name, type, reason, message)
        self.rec = Reconciler(self.kube, self.config, self._emit)  # type: ignore[arg-type]  # Kube's double

    def _emit(self, body: Body, type_: str, reason: str, message: str) -> None:
        self.events.append((body.get("kind", "?"), body["metadata"]["name"], type_, reason, message))

    def blueprint(self, name: str = "mlp", spec: dict[str, Any] | None = None, **meta: Any) -> Body:
        """A Blueprint as `kubectl apply` leaves it (the API server adds uid, generation, ...)."""
        stored = self.kube.peek("blueprints", NS, name)
        body: Body = {
            "apiVersion": "esper.dev/v1alpha1",
            "kind": "Blueprint",
            "metadata": {"name": name, "namespace": NS, **meta},
            "spec": spec if spec is not None else SPEC,
        }
        if stored is not None:  # an edit: same object, next generation, status kept
            body["metadata"] = {**stored["metadata"], **meta}
            body["metadata"]["generation"] = stored["metadata"]["generation"] + 1
            body["status"] = stored.get("status") or {}
            self.kube.objects[("blueprints", NS, name)] = body
            return self.kube.peek("blueprints", NS, name)  # type: ignore[return-value]
        return self.kube.put("blueprints", NS, body)

    async def reconcile(self, name: str = "mlp") -> Body:
        """One reconcile, its returned status written as kopf writes it (a merge patch)."""
        body = self.kube.peek("blueprints", NS, name)
        assert body is not None
        status = await self.rec.reconcile_blueprint(body)
        self.kube.set_status("blueprints", NS, name, merge_patch(body.get("status") or {}, status))
        return status

    def kernel(self, name: str, namespace: str = NS) -> Body:
        kernel = self.kube.peek("kernels", namespace, name)
        assert kernel is not None, f"no Kernel {name}"
        return kernel

    def job(self, name: str) -> Body:
        job = self.kube.peek("jobs", COMPILE_NS, name)
        assert job is not None, f"no Job {name}"
        return job

    def job_of(self, kernel: Body, attempt: int = 1) -> str:
        """The Job name the contract gives attempt `attempt` of this Kernel (computed by hand)."""
        uid8 = kernel["metadata"]["uid"].replace("-", "")[:8]
        base = f"tezzeret-{kernel['metadata']['name']}-{uid8}"
        return base if attempt == 1 else f"{base}-{attempt}"

    def store_manifest(self, key: str, data: bytes | None = None) -> str:
        """A bundle's manifest as a compile Job leaves it in the store; its sha256."""
        data = json.dumps({"key": key}).encode() if data is None else data
        d = self.store_dir / "kernels" / key
        d.mkdir(parents=True, exist_ok=True)
        (d / "manifest.json").write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def uri(self, key: str) -> str:
        return f"file://{self.store_dir}/kernels/{key}"

    def result(self, key: str, sha: str, **over: Any) -> dict[str, Any]:
        """A compile Pod's termination message."""
        return {
            "key": key,
            "uri": self.uri(key),
            "manifestSha256": sha,
            "size": 4096,
            "toolchain": TOOLCHAIN,
            "compileSeconds": 41.23456,
            "report": REPORT,
            **over,
        }

    def pod(self, job: str, *, phase: str, terminated: dict[str, Any], pod: str = "", **status: Any) -> Body:
        """A Pod the Job controller made for `job` (controller ownerReference and uid labels)."""
        uid = self.job(job)["metadata"]["uid"]
        body = {
            "metadata": {
                "name": pod or f"{job}-abcde",
                "labels": {"job-name": job, "controller-uid": uid, "batch.kubernetes.io/controller-uid": uid},
                "ownerReferences": [{"kind": "Job", "name": job, "uid": uid, "controller": True}],
            },
            "status": {
                "phase": phase,
                "containerStatuses": [{"name": "tezzeret", "state": {"terminated": terminated}}],
                **status,
            },
        }
        return self.kube.put("pods", COMPILE_NS, body)

    def succeed(self, job: str, result: dict[str, Any] | str) -> Body:
        """The Job ran its Pod to success; its termination message is `result`."""
        message = result if isinstance(result, str) else json.dumps(result)
        self.pod(job, phase="Succeeded", terminated={"exitCode": 0, "message": message})
        conditions = [{"type": "Complete", "status": "True"}]
        status = {"conditions": conditions, "succeeded": 1, "startTime": STARTED, "completionTime": COMPLETED}
        return self.kube.set_status("jobs", COMPILE_NS, job, status)

    def fail(self, job: str, *, job_reason: str = "BackoffLimitExceeded", code: int = 1, **pod: Any) -> Body:
        """The Job failed: its last Pod exited with `code`."""
        self.pod(job, phase="Failed", terminated={"exitCode": code, "message": "boom"}, **pod)
        conditions = [{"type": "Failed", "status": "True", "reason": job_reason}]
        return self.kube.set_status("jobs", COMPILE_NS, job, {"conditions": conditions, "failed": 1})

    def kernel_events(self) -> list[tuple[str, str, str, str]]:
        return [e[1:] for e in self.events if e[0] == "Kernel"]


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def owner(world: World, name: str = "mlp") -> dict[str, str]:
    uid = world.kube.peek("blueprints", NS, name)["metadata"]["uid"]  # type: ignore[index]
    return {"apiVersion": "esper.dev/v1alpha1", "kind": "Blueprint", "name": name, "uid": uid}


def condition(obj: Body, type_: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


def histogram(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---- a new Blueprint: its Kernel and compile Job ---------------------------------------------------


async def test_a_new_blueprint_creates_its_kernel_with_owner_labels_and_finalizer(world: World) -> None:
    world.blueprint()
    await world.reconcile()
    key, name = key_of(SPEC), kernel_name(SPEC)
    create = world.kube.written("create", "kernels")
    assert len(create) == 1
    expected_spec = (
        plan_blueprint("mlp", SPEC, torch_version="2.13.0").kernels[0].spec.model_dump(mode="json")
    )
    assert create[0].body == {
        "apiVersion": "esper.dev/v1alpha1",
        "kind": "Kernel",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {
                "app.kubernetes.io/managed-by": "esper-operator",
                "esper.dev/target": "cpu",
                "esper.dev/ir-digest": digest_of(SPEC)[:32],
                "blueprint.esper.dev/mlp": "candidate",
                "esper.dev/template": "residual-mlp",
            },
            "ownerReferences": [owner(world)],
            "finalizers": ["esper.dev/finalizer"],
        },
        "spec": expected_spec,
    }
    assert expected_spec["key"] == key and expected_spec["blueprint"] == "mlp"


async def test_a_head_start_makes_the_kernel_and_job_and_the_reconcile_only_the_status(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new Blueprint's first watch event creates its Kernel and Job; the reconcile that follows (kopf's
    next cycle) asks the API server for nothing and returns the status a plain reconcile would."""
    world.blueprint(generation=4)  # the key is this generation, not the first
    plans = []
    monkeypatch.setattr(
        "esper_operator.reconcile.plan_blueprint", lambda *a, **k: plans.append(a) or plan_blueprint(*a, **k)
    )
    await world.rec.prepare_blueprint(world.kube.peek("blueprints", NS, "mlp"))  # type: ignore[arg-type]
    kernel = world.kernel(kernel_name(SPEC))
    assert [(w.verb, w.plural) for w in world.kube.writes] == [
        ("create", "kernels"), ("create", "jobs"), ("patch_status", "kernels")
    ]  # fmt: skip
    assert kernel["status"]["jobName"] == world.job_of(kernel) and world.job(world.job_of(kernel))
    writes, reads = len(world.kube.writes), len(world.kube.reads)
    status = await world.reconcile()
    assert world.kube.writes[writes:] == [] and world.kube.reads[reads:] == []
    assert len(plans) == 1  # nor plans it again
    ref = {"target": "cpu", "name": kernel_name(SPEC), "phase": "Compiling"}
    assert (status["phase"], status["kernels"], status["revision"]) == ("Compiling", [ref], 1)
    assert status["digest"] == digest_of(SPEC)


async def test_a_head_start_is_made_once_per_generation(world: World) -> None:
    """kopf's finalizer write brings a second event before the reconcile: it adds no request."""
    world.blueprint()
    body = world.kube.peek("blueprints", NS, "mlp")
    await world.rec.prepare_blueprint(body)  # type: ignore[arg-type]
    writes, reads = len(world.kube.writes), len(world.kube.reads)
    await world.rec.prepare_blueprint(body)  # type: ignore[arg-type]
    assert world.kube.writes[writes:] == [] and world.kube.reads[reads:] == []


async def test_a_head_start_for_another_generation_or_plan_is_not_used(world: World) -> None:
    """The reconcile uses a head start only for the same uid and generation; else it does it all."""
    world.blueprint()
    await world.rec.prepare_blueprint(world.kube.peek("blueprints", NS, "mlp"))  # type: ignore[arg-type]
    first = kernel_name(SPEC)
    assert world.kube.peek("kernels", NS, first) is not None  # the head start made generation 1's Kernel
    world.blueprint(spec=SPEC_2)  # edited before kopf's reconcile ran: generation 2, another Kernel
    status = await world.reconcile()
    assert [k["name"] for k in status["kernels"]] == [kernel_name(SPEC_2)]
    assert world.kernel(kernel_name(SPEC_2))["status"]["phase"] == "Compiling"
    # No status named it: released here (deleted; its finalizer's cleanup then deletes its Job), not leaked.
    assert deleted_kernels(world) == [first]
    assert world.kube.peek("kernels", NS, first)["metadata"]["deletionTimestamp"]  # type: ignore[index]


def deleted_kernels(world: World) -> list[str]:
    return [w.name for w in world.kube.writes if (w.verb, w.plural) == ("delete", "kernels")]


async def test_a_superseded_head_start_is_released_when_the_latest_is_used(world: World) -> None:
    """Two head starts (edited between the two events, before any status): the reconcile uses the
    second and releases the first's Kernel."""
    world.blueprint()
    await world.rec.prepare_blueprint(world.kube.peek("blueprints", NS, "mlp"))  # type: ignore[arg-type]
    world.blueprint(spec=SPEC_2)
    await world.rec.prepare_blueprint(world.kube.peek("blueprints", NS, "mlp"))  # type: ignore[arg-type]
    creates = len([w for w in world.kube.writes if w.verb == "create"])
    status = await world.reconcile()
    assert [k["name"] for k in status["kernels"]] == [kernel_name(SPEC_2)]
    assert len([w for w in world.kube.writes if w.verb == "create"]) == creates  # the head start was used
    assert deleted_kernels(world) == [kernel_name(SPEC)]


async def test_a_restart_between_head_start_and_edit_still_releases(world: World) -> None:
    """The head start's record is lost with the process: a first reconcile of a later generation lists
    the Kernels this Blueprint owns and releases those outside its plan; one of generation 1 lists none."""
    world.blueprint("bystander", spec=mlp(24))
    await world.reconcile("bystander")  # its Kernel, in the same namespace, is none of mlp's business
    world.blueprint()
    await world.rec.prepare_blueprint(world.kube.peek("blueprints", NS, "mlp"))  # type: ignore[arg-type]
    world.rec = Reconciler(world.kube, world.config, world._emit)  # type: ignore[arg-type]
    world.blueprint(spec=SPEC_2)
    writes, reads = len(world.kube.writes), len(world.kube.reads)
    await world.reconcile()
    assert deleted_kernels(world) == [kernel_name(SPEC)]
    assert kernel_name(mlp(24)) not in {w.name for w in world.kube.writes[writes:]}
    assert kernel_name(SPEC) not in {r.name for r in world.kube.reads[reads:]}  # as listed, not read again
    world.blueprint("fresh", spec=mlp(40))
    reads = len(world.kube.reads)
    await world.reconcile("fresh")
    assert [r.verb for r in world.kube.reads[reads:]] == []  # no list for a first generation


async def test_a_kernel_shared_with_another_blueprint_is_only_let_go(world: World) -> None:
    """Generation 1's Kernel, also held by another Blueprint, loses this owner and stays."""
    world.blueprint("other")
    await world.reconcile("other")
    world.blueprint()
    await world.rec.prepare_blueprint(world.kube.peek("blueprints", NS, "mlp"))  # type: ignore[arg-type]
    world.blueprint(spec=SPEC_2)
    await world.reconcile()
    shared = world.kube.peek("kernels", NS, kernel_name(SPEC))
    assert shared is not None
    owners = [o["name"] for o in shared["metadata"]["ownerReferences"]]
    assert owners == ["other"] and requester_label("mlp") not in shared["metadata"]["labels"]


async def test_a_head_start_without_a_generation_counts_as_generation_one(world: World) -> None:
    world.blueprint()
    body = world.kube.peek("blueprints", NS, "mlp")
    del body["metadata"]["generation"]  # type: ignore[index]
    await world.rec.prepare_blueprint(body)  # type: ignore[arg-type]
    writes, reads = len(world.kube.writes), len(world.kube.reads)
    await world.rec.reconcile_blueprint(body)  # type: ignore[arg-type]
    assert world.kube.writes[writes:] == [] and world.kube.reads[reads:] == []


async def test_head_starts_beyond_the_limit_are_forgotten_oldest_first(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prepared Blueprints whose reconcile never comes (deleted at once) cannot pile up."""
    monkeypatch.setattr("esper_operator.reconcile.PREPARED_LIMIT", 2)
    specs = {"a": mlp(32), "b": mlp(40), "c": mlp(48)}
    for name, spec in specs.items():
        world.blueprint(name, spec=spec)
        await world.rec.prepare_blueprint(world.kube.peek("blueprints", NS, name))  # type: ignore[arg-type]
    asked = {}
    for name in specs:
        writes, reads = len(world.kube.writes), len(world.kube.reads)
        await world.reconcile(name)
        asked[name] = len(world.kube.writes) - writes + len(world.kube.reads) - reads > 0
    assert asked == {"a": True, "b": False, "c": False}  # "a" was forgotten: its reconcile does it all


async def test_an_invalid_blueprint_gets_no_head_start(world: World) -> None:
    world.blueprint(spec={"template": {"name": "no-such-template"}, "targets": ["cpu"]})
    await world.rec.prepare_blueprint(world.kube.peek("blueprints", NS, "mlp"))  # type: ignore[arg-type]
    assert world.kube.writes == [] and world.events == []


async def test_an_explicit_graph_has_no_template_label(world: World) -> None:
    world.blueprint(spec=GRAPH_SPEC)
    await world.reconcile()
    labels = world.kernel(kernel_name(GRAPH_SPEC))["metadata"]["labels"]
    assert "esper.dev/template" not in labels and labels["esper.dev/target"] == "cpu"


async def test_an_owner_reference_defaults_to_the_blueprint_kind(world: World) -> None:
    """A body without apiVersion and kind (as the handler may pass it) still names a Blueprint."""
    world.blueprint()
    body = world.kube.peek("blueprints", NS, "mlp")
    del body["apiVersion"], body["kind"]  # type: ignore[index]
    await world.rec.reconcile_blueprint(body)  # type: ignore[arg-type]
    assert world.kernel(kernel_name(SPEC))["metadata"]["ownerReferences"] == [owner(world)]


async def test_the_compile_job_runs_in_the_compile_namespace_and_names_its_kernel(world: World) -> None:
    world.blueprint()
    await world.reconcile()
    kernel = world.kernel(kernel_name(SPEC))
    uid = kernel["metadata"]["uid"]
    job_name = f"tezzeret-{kernel_name(SPEC)}-{uid.replace('-', '')[:8]}"
    [create] = world.kube.written("create", "jobs")
    assert (create.namespace, create.name) == (COMPILE_NS, job_name)
    assert (create.body["metadata"]["namespace"], create.body["metadata"]["name"]) == (COMPILE_NS, job_name)
    assert create.body["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "esper-operator",
        "esper.dev/kernel": kernel_name(SPEC),
        "esper.dev/kernel-namespace": NS,
        "esper.dev/kernel-uid": uid,
        "esper.dev/target": "cpu",
    }
    container = create.body["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["--store", world.store_dir.as_uri()]
    env = {e["name"]: e.get("value") for e in container["env"]}
    request = CompileRequest.model_validate_json(env[REQUEST_ENV])
    assert (request.blueprint, request.namespace, request.target) == ("mlp", NS, "cpu")
    assert (request.expectKey, request.expectTorch) == (key_of(SPEC), "2.13.0")
    assert world.kernel_events() == []  # the first Job is named in the Kernel's status, not an Event


async def test_a_kernel_with_a_job_is_compiling_and_names_the_job(world: World) -> None:
    world.blueprint(generation=4)
    status = await world.reconcile()
    name = kernel_name(SPEC)
    kernel = world.kernel(name)
    job = world.job(world.job_of(kernel))
    expected = {
        "phase": "Compiling",
        "reason": "JobCreated",
        "message": f"compiling in Job esper/{world.job_of(kernel)}",
        "observedGeneration": 1,  # the Kernel's own generation
        "jobName": world.job_of(kernel),
        "jobNamespace": COMPILE_NS,
        "jobUid": job["metadata"]["uid"],
        "attempts": 1,
        "retryAt": "",
        "requesters": [{"blueprint": "mlp", "role": "candidate"}],
        "requestedBy": "mlp",
    }
    assert {k: kernel["status"][k] for k in expected} == expected
    assert condition(kernel, "Ready")["status"] == "False"
    ref = {"target": "cpu", "name": name, "phase": "Compiling"}
    assert {k: status[k] for k in ("phase", "digest", "kernels", "observedGeneration")} == {
        "phase": "Compiling",
        "digest": digest_of(SPEC),
        "kernels": [ref],
        "observedGeneration": 4,
    }
    assert {k: status[k] for k in ("revision", "serving", "servingSummary", "history")} == {
        "revision": 1,
        "serving": [],
        "servingSummary": "0/1",
        "history": [],
    }


async def test_a_blueprint_without_a_generation_counts_as_generation_one(world: World) -> None:
    world.blueprint()
    body = world.kube.peek("blueprints", NS, "mlp")
    del body["metadata"]["generation"]  # type: ignore[index]
    status = await world.rec.reconcile_blueprint(body)  # type: ignore[arg-type]
    assert status["observedGeneration"] == 1


async def test_reconciling_again_changes_nothing(world: World) -> None:
    """A resync or a second replica's stale event: the Kernel and Job are adopted, not duplicated."""
    world.blueprint()
    first = await world.reconcile()
    writes, events = len(world.kube.writes), len(world.events)
    second = await world.reconcile()
    assert world.kube.names("kernels") == [kernel_name(SPEC)] and len(world.kube.names("jobs")) == 1
    later = world.kube.writes[writes:]
    assert [(w.verb, w.plural) for w in later] == [("create", "kernels")]  # answered 409, adopted
    assert len(world.events) == events
    assert {k: v for k, v in second.items() if k != "conditions"} == {
        k: v for k, v in first.items() if k != "conditions"
    }


async def test_a_second_blueprint_of_the_same_spec_shares_the_kernel(world: World) -> None:
    world.blueprint("a")
    world.blueprint("b")
    await world.reconcile("a")
    await world.reconcile("b")
    name = kernel_name(SPEC)
    kernel = world.kernel(name)
    assert kernel["metadata"]["ownerReferences"] == [owner(world, "a"), owner(world, "b")]
    assert kernel["metadata"]["labels"]["blueprint.esper.dev/a"] == "candidate"
    assert kernel["metadata"]["labels"]["blueprint.esper.dev/b"] == "candidate"
    assert kernel["status"]["requesters"] == [
        {"blueprint": "a", "role": "candidate"},
        {"blueprint": "b", "role": "candidate"},
    ]
    assert len(world.kube.names("jobs")) == 1  # one key, one compile
    adopt = [w for w in world.kube.written("patch", "kernels") if "blueprint.esper.dev/b" not in str(w.body)]
    assert adopt[0].body["metadata"]["ownerReferences"] == [owner(world, "a"), owner(world, "b")]
    assert adopt[0].body["metadata"]["resourceVersion"]  # conditional on what was read


class Contended(FakeKube):
    """Another writer changes the Kernel between each read and write of this one, `times` times."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times

    async def patch(self, plural: str, namespace: str, name: str, patch: Body) -> Body | None:
        if self.times > 0 and plural == "kernels":
            self.times -= 1
            self.writes.append(Write("patch", plural, namespace, name, patch))
            raise Conflict("the object has been modified")
        return await super().patch(plural, namespace, name, patch)


async def test_adoption_is_retried_on_a_conflict(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.blueprint("a")
    world.blueprint("b")
    await world.reconcile("a")
    contended = Contended(times=7)
    contended.objects, contended._revision = world.kube.objects, world.kube._revision
    world.kube = world.rec.kube = contended  # type: ignore[assignment]
    await world.reconcile("b")
    assert world.kernel(kernel_name(SPEC))["metadata"]["ownerReferences"] == [
        owner(world, "a"),
        owner(world, "b"),
    ]
    adopts = [w for w in contended.written("patch", "kernels") if "labels" not in w.body["metadata"]]
    assert len(adopts) == 8  # seven conflicts, then the write


async def test_adoption_gives_up_after_eight_conflicts(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.blueprint("a")
    world.blueprint("b")
    await world.reconcile("a")
    contended = Contended(times=8)
    contended.objects, contended._revision = world.kube.objects, world.kube._revision
    world.rec.kube = contended  # type: ignore[assignment]
    body = contended.peek("blueprints", NS, "b")
    name = kernel_name(SPEC)
    with pytest.raises(
        RuntimeError, match=f"^could not add owner to Kernel {name}: too many conflicts; will retry$"
    ):
        await world.rec.reconcile_blueprint(body)  # type: ignore[arg-type]
    assert len(contended.written("patch", "kernels")) == 8
    assert world.kernel(name)["metadata"]["ownerReferences"] == [owner(world, "a")]


class Vanishing(FakeKube):
    """The Kernel is deleted by someone else right after this operator's create answers 409."""

    async def create(self, plural: str, namespace: str, body: Body) -> Body:
        try:
            return await super().create(plural, namespace, body)
        except Conflict:
            del self.objects[(plural, namespace, body["metadata"]["name"])]
            raise


async def test_a_kernel_that_vanishes_while_adopted_is_retried_later(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.blueprint("a")
    world.blueprint("b")
    await world.reconcile("a")
    vanishing = Vanishing()
    vanishing.objects = world.kube.objects
    world.rec.kube = vanishing  # type: ignore[assignment]
    name = kernel_name(SPEC)
    with pytest.raises(RuntimeError, match=f"^Kernel {name} vanished while being adopted; will retry$"):
        await world.rec.reconcile_blueprint(vanishing.peek("blueprints", NS, "b"))  # type: ignore[arg-type]


class GoneOnPatch(FakeKube):
    """The Kernel is deleted between this operator's read and its patch (the patch answers 404)."""

    async def patch(self, plural: str, namespace: str, name: str, patch: Body) -> Body | None:
        self.objects.pop((plural, namespace, name), None)
        return await super().patch(plural, namespace, name, patch)


async def test_a_kernel_deleted_during_adoption_is_not_adopted(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.blueprint("a")
    world.blueprint("b")
    await world.reconcile("a")
    gone = GoneOnPatch()
    gone.objects = world.kube.objects
    world.rec.kube = gone  # type: ignore[assignment]
    name = kernel_name(SPEC)
    with pytest.raises(RuntimeError, match=f"^Kernel {name} vanished while being adopted; will retry$"):
        await world.rec.reconcile_blueprint(gone.peek("blueprints", NS, "b"))  # type: ignore[arg-type]
    assert len(gone.written("patch", "kernels")) == 1


# ---- a finished compile Job: its result on the Kernel and the Blueprint -----------------------------


async def compiling(world: World, name: str = "mlp", spec: dict[str, Any] | None = None) -> tuple[Body, str]:
    """A reconciled Blueprint whose Kernel is Compiling: (the Kernel, its Job's name)."""
    world.blueprint(name, spec)
    await world.reconcile(name)
    kernel = world.kernel(kernel_name(spec or SPEC))
    return kernel, world.job_of(kernel)


async def test_a_succeeded_job_makes_the_kernel_ready_with_its_artifact(world: World) -> None:
    kernel, job = await compiling(world)
    key, name = key_of(SPEC), kernel["metadata"]["name"]
    sha = world.store_manifest(key)
    before = histogram("esper_compile_job_seconds_sum", target="cpu", outcome="succeeded")
    await world.rec.observe_job(world.succeed(job, world.result(key, sha)))
    status = world.kernel(name)["status"]
    expected = {
        "phase": "Ready",
        "reason": "Compiled",
        "message": "",
        "observedGeneration": 1,
        "jobName": job,
        "artifact": {"uri": world.uri(key), "sha256": sha, "size": 4096},
        "toolchain": TOOLCHAIN,
        "report": {**REPORT, "maxGradError": 0.0, "trainSpeedup": 0.0},  # defaults filled in
        "compileSeconds": 41.235,
    }
    assert {k: status[k] for k in expected} == expected
    assert condition(world.kernel(name), "Ready")["status"] == "True"
    [ready_write] = [
        w.body for w in world.kube.written("patch_status", "kernels") if w.body.get("phase") == "Ready"
    ]
    assert {k: v for k, v in ready_write.items() if k != "conditions"} == expected  # and nothing else
    assert world.kernel_events()[-1] == (
        name,
        "Normal",
        "Compiled",
        f"Ready: {world.uri(key)} (2.50x over eager)",
    )
    after = histogram("esper_compile_job_seconds_sum", target="cpu", outcome="succeeded")
    assert after - before == pytest.approx(42.0)  # startTime to completionTime


async def test_a_ready_kernel_makes_its_blueprint_ready_and_serving(world: World) -> None:
    kernel, job = await compiling(world)
    key, name = key_of(SPEC), kernel["metadata"]["name"]
    await world.rec.observe_job(world.succeed(job, world.result(key, world.store_manifest(key))))
    status = world.kube.peek("blueprints", NS, "mlp")["status"]  # type: ignore[index]
    assert status["phase"] == "Ready" and status["kernels"] == [
        {"target": "cpu", "name": name, "phase": "Ready"}
    ]
    assert status["serving"] == [{"target": "cpu", "name": name, "phase": "Ready"}]
    assert status["servingSummary"] == "1/1" and status["message"] == "all 1 Kernel(s) Ready"
    assert world.kernel(name)["metadata"]["labels"]["blueprint.esper.dev/mlp"] == "serving"
    assert world.kernel(name)["status"]["requesters"] == [{"blueprint": "mlp", "role": "serving"}]
    assert ("Blueprint", "mlp", "Normal", "Ready", "all 1 Kernel(s) Ready") in world.events


async def test_a_replaced_bundle_is_said_on_the_kernel(world: World) -> None:
    kernel, job = await compiling(world)
    key = key_of(SPEC)
    result = world.result(key, world.store_manifest(key), replaced="the stored bundle did not verify")
    await world.rec.observe_job(world.succeed(job, result))
    name = kernel["metadata"]["name"]
    assert (name, "Warning", "BundleReplaced", "the stored bundle did not verify") in world.kernel_events()
    assert world.kernel(name)["status"]["phase"] == "Ready"


async def test_a_result_without_a_report_is_ready_at_no_speedup(world: World) -> None:
    kernel, job = await compiling(world)
    key = key_of(SPEC)
    await world.rec.observe_job(world.succeed(job, world.result(key, world.store_manifest(key), report=None)))
    name = kernel["metadata"]["name"]
    assert "report" not in world.kernel(name)["status"]  # null in a merge patch: no field
    assert world.kernel_events()[-1] == (
        name,
        "Normal",
        "Compiled",
        f"Ready: {world.uri(key)} (0.00x over eager)",
    )


async def test_a_result_whose_manifest_differs_in_the_store_fails_the_kernel(world: World) -> None:
    kernel, job = await compiling(world)
    key = key_of(SPEC)
    world.store_manifest(key)
    failures = histogram("esper_compile_job_seconds_count", target="cpu", outcome="failed")
    await world.rec.observe_job(world.succeed(job, world.result(key, "f" * 64)))
    assert histogram("esper_compile_job_seconds_count", target="cpu", outcome="failed") == failures + 1
    status = world.kernel(kernel["metadata"]["name"])["status"]
    message = "manifest in the store does not match " + "f" * 64
    assert (status["phase"], status["reason"], status["message"]) == ("Failed", "ArtifactMismatch", message)
    blueprint = world.kube.peek("blueprints", NS, "mlp")["status"]  # type: ignore[index]
    assert blueprint["phase"] == "Failed" and blueprint["serving"] == []
    text = f"Kernel(s) failed: {kernel['metadata']['name']}"
    assert ("Blueprint", "mlp", "Warning", "Failed", text) in world.events


async def test_a_result_outside_the_store_fails_the_kernel(world: World, tmp_path: Path) -> None:
    kernel, job = await compiling(world)
    key = key_of(SPEC)
    sha = world.store_manifest(key)
    elsewhere = f"file://{tmp_path}/other/kernels/{key}"
    failures = histogram("esper_compile_job_seconds_count", target="cpu", outcome="failed")
    await world.rec.observe_job(world.succeed(job, world.result(key, sha, uri=elsewhere)))
    assert histogram("esper_compile_job_seconds_count", target="cpu", outcome="failed") == failures + 1
    status = world.kernel(kernel["metadata"]["name"])["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "BadResult")
    assert status["message"] == f"artifact URI {elsewhere} is outside the store"


@pytest.mark.parametrize(
    ("manifest", "stored"),
    [(json.dumps({"key": "e" * 64}).encode(), "e" * 64), (b"not json", None), (b"[1, 2]", None)],
)
async def test_a_stored_manifest_of_another_key_is_ignored(
    world: World, manifest: bytes, stored: str | None
) -> None:
    """The Kernel stays Compiling, with a Warning: another Job's result is not this Kernel's."""
    kernel, job = await compiling(world)
    key, name = key_of(SPEC), kernel["metadata"]["name"]
    sha = world.store_manifest(key, manifest)
    before = world.kernel(name)["status"]
    await world.rec.observe_job(world.succeed(job, world.result(key, sha)))
    assert world.kernel(name)["status"] == before
    message = f"ignored the result of Job {job}: the stored manifest is for key {stored}, not {key}"
    assert world.kernel_events()[-1] == (name, "Warning", "KeyMismatch", message)


async def test_a_store_that_cannot_be_read_is_retried_not_failed(world: World) -> None:
    kernel, job = await compiling(world)
    key = key_of(SPEC)
    finished_job = world.succeed(job, world.result(key, "a" * 64))  # no bundle in the store
    with pytest.raises(RuntimeError, match=f"^cannot verify artifact {world.uri(key)}: .*; will retry$"):
        await world.rec.observe_job(finished_job)
    assert world.kernel(kernel["metadata"]["name"])["status"]["phase"] == "Compiling"


async def test_without_verification_the_store_is_not_read(tmp_path: Path) -> None:
    world = World(tmp_path, verify_artifacts=False)
    kernel, job = await compiling(world)
    key = key_of(SPEC)
    await world.rec.observe_job(world.succeed(job, world.result(key, "a" * 64)))  # no bundle stored
    status = world.kernel(kernel["metadata"]["name"])["status"]
    assert status["phase"] == "Ready" and status["artifact"]["sha256"] == "a" * 64


async def test_a_permanent_failure_fails_the_kernel_at_once(world: World) -> None:
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    before = histogram("esper_compile_job_seconds_count", target="cpu", outcome="failed")
    await world.rec.observe_job(world.fail(job, code=66))
    status = world.kernel(name)["status"]
    message = "compile Job failed (BackoffLimitExceeded) after 1 attempt(s); exit code 66; boom"
    assert {k: status[k] for k in ("phase", "reason", "message", "jobName", "attempts")} == {
        "phase": "Failed",
        "reason": "UnsupportedTarget",
        "message": message,
        "jobName": job,
        "attempts": 1,
    }
    assert world.kernel_events()[-1] == (name, "Warning", "UnsupportedTarget", message)
    assert world.kube.names("jobs", COMPILE_NS) == [job]  # kept for its logs (the TTL removes it)
    assert histogram("esper_compile_job_seconds_count", target="cpu", outcome="failed") == before + 1
    assert histogram("esper_compile_job_seconds_sum", target="cpu", outcome="failed") >= 0


def _at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_a_transient_failure_backs_off_then_starts_the_next_attempt(tmp_path: Path) -> None:
    world = World(tmp_path, retry_base_seconds=30, retry_max_seconds=900)
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    t0 = dt.datetime.now(dt.UTC)
    await world.rec.observe_job(world.fail(job, job_reason="BackoffLimitExceeded", code=1))
    t1 = dt.datetime.now(dt.UTC)
    status = world.kernel(name)["status"]
    at = _at(status["retryAt"])
    # attempt 1: a delay of 30 s, half of it fixed and half random
    assert t0 + dt.timedelta(seconds=15) - dt.timedelta(milliseconds=1) <= at <= t1 + dt.timedelta(seconds=30)
    detail = "compile Job failed (BackoffLimitExceeded) after 1 attempt(s); exit code 1; boom"
    message = f"attempt 1 failed (BackoffLimitExceeded: {detail}); retry at {status['retryAt']}"
    assert {k: status[k] for k in ("phase", "reason", "message", "jobName", "attempts")} == {
        "phase": "Pending",
        "reason": "RetryBackoff",
        "message": message,
        "jobName": job,
        "attempts": 1,
    }
    assert world.kernel_events()[-1] == (name, "Warning", "BackoffLimitExceeded", message)
    # before its time, the tick starts nothing
    await world.rec.kernel_tick(world.kernel(name))
    assert world.kube.names("jobs", COMPILE_NS) == [job]
    # once the back-off has passed, attempt 2 runs in a Job of its own and the failed one goes
    past = {**world.kernel(name)["status"], "retryAt": "2020-01-01T00:00:00.000Z"}
    world.kube.set_status("kernels", NS, name, past)
    await world.rec.kernel_tick(world.kernel(name))
    second = world.job_of(kernel, 2)
    assert world.kube.names("jobs", COMPILE_NS) == [second]
    assert world.kube.names("pods", COMPILE_NS) == []  # the failed Job's Pods went with it
    assert world.kernel_events()[-1] == (
        name,
        "Normal",
        "JobCreated",
        f"compile Job esper/{second}, attempt 2",
    )
    status = world.kernel(name)["status"]
    assert (status["phase"], status["attempts"], status["jobName"], status["retryAt"]) == (
        "Compiling",
        2,
        second,
        "",
    )
    blueprint = world.kube.peek("blueprints", NS, "mlp")["status"]  # type: ignore[index]
    assert blueprint["kernels"] == [{"target": "cpu", "name": name, "phase": "Compiling"}]


async def test_the_back_off_doubles_up_to_its_cap(tmp_path: Path) -> None:
    world = World(tmp_path, retry_base_seconds=30, retry_max_seconds=45, retry_limit=5)
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    await world.rec.observe_job(world.fail(job, job_reason="DeadlineExceeded"))
    past = {**world.kernel(name)["status"], "retryAt": "2020-01-01T00:00:00.000Z"}
    world.kube.set_status("kernels", NS, name, past)
    await world.rec.kernel_tick(world.kernel(name))
    t0 = dt.datetime.now(dt.UTC)
    await world.rec.observe_job(world.fail(world.job_of(kernel, 2), job_reason="DeadlineExceeded"))
    t1 = dt.datetime.now(dt.UTC)
    status = world.kernel(name)["status"]
    at = _at(status["retryAt"])
    # attempt 2: 30 * 2 = 60 s, capped at 45: between 22.5 and 45 s
    assert (
        t0 + dt.timedelta(seconds=22.5) - dt.timedelta(milliseconds=1) <= at <= t1 + dt.timedelta(seconds=45)
    )
    assert status["message"].startswith("attempt 2 failed (DeadlineExceeded: ")


async def test_a_transient_failure_past_the_retry_limit_fails(tmp_path: Path) -> None:
    world = World(tmp_path, retry_limit=0)
    kernel, job = await compiling(world)
    await world.rec.observe_job(world.fail(job, job_reason="BackoffLimitExceeded", reason="Evicted"))
    status = world.kernel(kernel["metadata"]["name"])["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "Evicted")


# ---- the cap on concurrent compile Jobs ---------------------------------------------------------------

SPECS = [mlp(h) for h in (32, 40, 56)]


async def test_the_cap_queues_kernels_past_it(tmp_path: Path) -> None:
    world = World(tmp_path, max_concurrent_jobs=2)
    for i, spec in enumerate(SPECS):
        world.blueprint(f"bp{i}", spec)
        await world.reconcile(f"bp{i}")
    assert len(world.kube.names("jobs", COMPILE_NS)) == 2
    third = world.kernel(kernel_name(SPECS[2]))
    message = "waiting for a compile slot: 2 of 2 in use"
    status = third["status"]
    assert {k: status[k] for k in ("phase", "reason", "message", "retryAt")} == {
        "phase": "Pending",
        "reason": "Queued",
        "message": message,
        "retryAt": "",
    }
    assert world.kernel_events()[-1] == (third["metadata"]["name"], "Normal", "Queued", message)
    assert world.kube.peek("blueprints", NS, "bp2")["status"]["kernels"][0]["phase"] == "Pending"  # type: ignore[index]
    # still queued: said once, not again
    writes, events = len(world.kube.writes), len(world.events)
    await world.rec.kernel_tick(third)
    assert len(world.events) == events
    assert [w for w in world.kube.writes[writes:] if w.verb in ("patch_status", "create")] == []
    # a slot frees (a Job ends): the queued Kernel's Job starts at the next tick
    first = world.kernel(kernel_name(SPECS[0]))
    world.fail(world.job_of(first), code=65)
    await world.rec.kernel_tick(world.kernel(third["metadata"]["name"]))
    assert world.job_of(third) in world.kube.names("jobs", COMPILE_NS)
    assert world.kernel(third["metadata"]["name"])["status"]["phase"] == "Compiling"
    assert world.kube.peek("blueprints", NS, "bp2")["status"]["kernels"][0]["phase"] == "Compiling"  # type: ignore[index]


async def test_jobs_not_managed_by_the_operator_take_no_slot(tmp_path: Path) -> None:
    world = World(tmp_path, max_concurrent_jobs=1)
    world.kube.put("jobs", COMPILE_NS, {"metadata": {"name": "someone-elses", "labels": {"app": "x"}}})
    kernel, _job = await compiling(world)
    assert world.kernel(kernel["metadata"]["name"])["status"]["phase"] == "Compiling"


async def test_with_a_cap_an_existing_job_is_adopted_not_counted(tmp_path: Path) -> None:
    """A Job made by an earlier pass whose status write was lost: found, not queued behind itself."""
    world = World(tmp_path, max_concurrent_jobs=1)
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    world.kube.set_status("kernels", NS, name, {})
    await world.rec.ensure_job(world.kernel(name), f"tezzeret-{name}")
    status = world.kernel(name)["status"]
    assert (status["phase"], status["jobName"], status["jobUid"]) == (
        "Compiling",
        job,
        world.job(job)["metadata"]["uid"],
    )
    assert len(world.kube.written("create", "jobs")) == 1


# ---- ensure_job ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["Ready", "Failed"])
async def test_a_settled_kernel_gets_no_job(world: World, phase: str) -> None:
    kernel, _job = await compiling(world)
    name = kernel["metadata"]["name"]
    world.kube.set_status("kernels", NS, name, {"phase": phase})
    writes = len(world.kube.writes)
    out = await world.rec.ensure_job(world.kernel(name), f"tezzeret-{name}")
    assert out == world.kernel(name) and world.kube.writes[writes:] == []


async def test_a_job_of_another_kernel_under_this_name_is_refused(world: World) -> None:
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    world.kube.put("jobs", COMPILE_NS, {**world.job(job), "metadata": {"name": job, "labels": {}}})
    with pytest.raises(
        RuntimeError, match=f"^compile Job esper/{job} vanished or is not this Kernel's; will retry$"
    ):
        await world.rec.ensure_job(world.kernel(name), f"tezzeret-{name}")


async def test_a_job_that_finished_unwatched_is_carried_over(world: World) -> None:
    """The operator was down when the Job ended: the next pass reads its result."""
    kernel, job = await compiling(world)
    key, name = key_of(SPEC), kernel["metadata"]["name"]
    world.succeed(job, world.result(key, world.store_manifest(key)))
    out = await world.rec.ensure_job(world.kernel(name), f"tezzeret-{name}")
    assert out["status"]["phase"] == "Ready" and out == world.kernel(name)


async def test_a_created_job_whose_status_write_was_lost_is_recorded(world: World) -> None:
    """The Kernel says nothing of its Job (a crash after the create): the 409 adopts the Job."""
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    world.kube.set_status("kernels", NS, name, {})
    out = await world.rec.ensure_job(world.kernel(name), f"tezzeret-{name}")
    assert world.kernel(name)["status"]["jobUid"] == world.job(job)["metadata"]["uid"]
    assert out == world.kernel(name)  # the Kernel as written, Compiling in that Job
    assert len(world.kube.written("create", "jobs")) == 2  # the second answered 409


@pytest.mark.parametrize("gone", [True, False], ids=["kernel-gone", "kernel-deleting"])
async def test_a_job_made_for_a_kernel_deleted_meanwhile_is_deleted(
    world: World, gone: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A resync read the Kernel, then the Kernel was deleted (its cleanup took its Job) before the pass
    made a new Job: that Job has no Kernel left to clean it up, so the pass deletes it."""
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    stale = world.kernel(name)
    if gone:
        world.kube.objects.pop(("kernels", NS, name))
    else:
        await world.kube.delete("kernels", NS, name)  # its finalizer holds it, deletionTimestamp set
    await world.rec.kernel_deleted(world.kube.peek("kernels", NS, name) or stale)
    assert world.kube.names("jobs", COMPILE_NS) == []
    with caplog.at_level(logging.INFO, logger="esper.operator"):
        out = await world.rec.ensure_job(stale, f"tezzeret-{name}")
    assert [w.name for w in world.kube.written("create", "jobs")][-1] == job  # made again, then:
    assert world.kube.names("jobs", COMPILE_NS) == []
    assert f"deleted compile Job {COMPILE_NS}/{job}: its Kernel was deleted meanwhile" in caplog.messages
    assert out == (stale if gone else world.kernel(name))  # the Kernel as last read or written


# ---- retry requested by a user, and the periodic tick -------------------------------------------------


async def failed(world: World) -> tuple[Body, str]:
    kernel, job = await compiling(world)
    await world.rec.observe_job(world.fail(job, code=67))
    return world.kernel(kernel["metadata"]["name"]), job


async def test_a_user_retry_compiles_a_failed_kernel_again(world: World) -> None:
    kernel, _job = await failed(world)
    name = kernel["metadata"]["name"]
    world.kube.objects[("kernels", NS, name)]["metadata"]["annotations"] = {"esper.dev/retry": "t1"}
    await world.rec.kernel_tick(world.kernel(name))
    message = "retry requested after 1 attempt(s): ValidationFailed"
    requested = [
        w.body
        for w in world.kube.written("patch_status", "kernels")
        if w.body.get("reason") == "RetryRequested"
    ]
    assert len(requested) == 1
    assert {k: requested[0][k] for k in ("phase", "message", "retryToken", "retryBase", "retryAt")} == {
        "phase": "Pending",
        "message": message,
        "retryToken": "t1",
        "retryBase": 1,
        "retryAt": "",
    }
    assert (name, "Normal", "RetryRequested", message) in world.kernel_events()
    status = world.kernel(name)["status"]
    assert (status["phase"], status["attempts"], status["jobName"]) == (
        "Compiling",
        2,
        world.job_of(kernel, 2),
    )
    assert world.kube.names("jobs", COMPILE_NS) == [world.job_of(kernel, 2)]
    assert world.kube.peek("blueprints", NS, "mlp")["status"]["phase"] == "Compiling"  # type: ignore[index]
    # acted on once: the same token again does nothing
    writes = len(world.kube.writes)
    await world.rec.kernel_tick(world.kernel(name))
    assert world.kube.writes[writes:] == []


async def test_a_user_retry_without_attempts_counts_one(world: World) -> None:
    kernel, _job = await failed(world)
    name = kernel["metadata"]["name"]
    world.kube.set_status("kernels", NS, name, {"phase": "Failed"})
    world.kube.objects[("kernels", NS, name)]["metadata"]["annotations"] = {"esper.dev/retry": "t1"}
    await world.rec.kernel_tick(world.kernel(name))
    [requested] = [
        w.body
        for w in world.kube.written("patch_status", "kernels")
        if w.body.get("reason") == "RetryRequested"
    ]
    assert (requested["message"], requested["retryBase"]) == ("retry requested after 1 attempt(s): ", 1)


async def test_the_tick_ignores_a_deleted_or_busy_kernel(world: World) -> None:
    kernel, _job = await compiling(world)
    name = kernel["metadata"]["name"]
    writes = len(world.kube.writes)
    await world.rec.kernel_tick(world.kernel(name))  # Compiling: nothing waits
    deleting = world.kernel(name)
    deleting["metadata"]["deletionTimestamp"] = "2026-11-26T10:00:00Z"
    deleting["metadata"]["annotations"] = {"esper.dev/retry": "t1"}
    deleting["status"] = {"phase": "Failed"}
    await world.rec.kernel_tick(deleting)
    assert world.kube.writes[writes:] == []


# ---- a compile Pod that cannot start --------------------------------------------------------------------


def waiting_pod(
    world: World, job: str, reason: str | None, message: str = "secret esper-s3 not found"
) -> Body:
    """The compile Pod of `job`, its container waiting for `reason` (None: running)."""
    uid = world.job(job)["metadata"]["uid"]
    kernel = world.job(job)["metadata"]["labels"]
    state = {"waiting": {"reason": reason, "message": message}} if reason else {"running": {}}
    return {
        "metadata": {
            "name": f"{job}-pod",
            "namespace": COMPILE_NS,
            "labels": {
                "job-name": job,
                "controller-uid": uid,
                "esper.dev/kernel": kernel["esper.dev/kernel"],
                "esper.dev/kernel-namespace": kernel["esper.dev/kernel-namespace"],
            },
            "ownerReferences": [{"kind": "Job", "name": job, "uid": uid, "controller": True}],
        },
        "status": {"phase": "Pending", "containerStatuses": [{"name": "tezzeret", "state": state}]},
    }


async def test_a_pod_that_cannot_start_is_said_on_its_kernel_then_cleared(world: World) -> None:
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    await world.rec.observe_pod(waiting_pod(world, job, "CreateContainerConfigError"))
    message = f"compile Pod {job}-pod cannot start: secret esper-s3 not found"
    status = world.kernel(name)["status"]
    assert (status["phase"], status["reason"], status["message"]) == (
        "Compiling",
        "CreateContainerConfigError",
        message,
    )
    assert world.kernel_events()[-1] == (name, "Warning", "CreateContainerConfigError", message)
    # the same state again: said once
    writes, events = len(world.kube.writes), len(world.events)
    await world.rec.observe_pod(waiting_pod(world, job, "CreateContainerConfigError"))
    assert (len(world.kube.writes), len(world.events)) == (writes, events)
    # another message for the same reason is news
    await world.rec.observe_pod(waiting_pod(world, job, "CreateContainerConfigError", "key missing"))
    assert world.kernel(name)["status"]["message"] == f"compile Pod {job}-pod cannot start: key missing"
    # the Secret appears and the Pod starts: back to compiling, no Event
    events = len(world.events)
    await world.rec.observe_pod(waiting_pod(world, job, None))
    status = world.kernel(name)["status"]
    assert (status["reason"], status["message"]) == ("JobCreated", f"compiling in Job esper/{job}")
    assert len(world.events) == events


def unschedulable(pod: Body, message: str) -> Body:
    """`pod` as the scheduler leaves one that no node can take."""
    cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
    return {**pod, "status": {"phase": "Pending", "conditions": [cond]}}


@pytest.mark.parametrize(
    ("target", "hint"),
    [
        (
            "cpu-avx512",
            "a cpu-avx512 Job needs an AVX-512 node with the labels of compile.avx512.nodeSelector",
        ),
        ("cuda-sm90", "a CUDA Job needs a node with the GPU resource"),
        ("cpu", None),
    ],
)
async def test_a_pod_no_node_can_take_is_said_on_its_kernel_with_where_it_must_land(
    world: World, target: str, hint: str | None
) -> None:
    """A cluster without AVX-512 (or GPU) nodes: the Kernel says why it is not compiling, at once,
    instead of sitting Compiling until the Job's deadline; once a node takes the Pod, it is cleared."""
    spec = {**SPEC, "targets": [target]}
    world.blueprint("mlp", spec)
    await world.reconcile("mlp")
    name = f"{target}-{key_of(spec)[:16]}"
    job = world.job_of(world.kernel(name))
    assert world.job(job)["metadata"]["labels"]["esper.dev/target"] == target
    scheduler = "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."
    pod = waiting_pod(world, job, None)
    pod["metadata"]["labels"]["esper.dev/target"] = target  # as the Job's template labels its Pods
    await world.rec.observe_pod(unschedulable(pod, scheduler))
    status = world.kernel(name)["status"]
    message = f"compile Pod {job}-pod cannot start: {scheduler}" + (f" ({hint}" if hint else "")
    assert (status["phase"], status["reason"]) == ("Compiling", "Unschedulable")
    assert status["message"].startswith(message) and (hint is not None) == status["message"].endswith(")")
    assert world.kernel_events()[-1] == (name, "Warning", "Unschedulable", status["message"])
    await world.rec.observe_pod(pod)  # scheduled and running
    status = world.kernel(name)["status"]
    assert (status["phase"], status["reason"]) == ("Compiling", "JobCreated")


async def test_a_running_pod_of_a_kernel_that_was_never_stuck_changes_nothing(world: World) -> None:
    _kernel, job = await compiling(world)
    writes = len(world.kube.writes)
    await world.rec.observe_pod(waiting_pod(world, job, None))
    await world.rec.observe_pod(waiting_pod(world, job, "ContainerCreating"))  # heals by waiting
    assert world.kube.writes[writes:] == []


@pytest.mark.parametrize(
    "change",
    [
        "namespace",
        "controller",
        "kernel-label",
        "kernel-namespace-label",
        "other-job",
        "not-compiling",
        "no-kernel",
    ],
)
async def test_pods_that_are_not_a_compiling_kernels_own_are_ignored(world: World, change: str) -> None:
    kernel, job = await compiling(world)
    pod = waiting_pod(world, job, "ErrImagePull")
    labels = pod["metadata"]["labels"]
    if change == "namespace":
        pod["metadata"]["namespace"] = NS
    elif change == "controller":
        pod["metadata"]["ownerReferences"] = []
    elif change == "kernel-label":
        del labels["esper.dev/kernel"]
    elif change == "kernel-namespace-label":
        del labels["esper.dev/kernel-namespace"]
    elif change == "other-job":
        pod["metadata"]["ownerReferences"][0]["uid"] = labels["controller-uid"] = "other"
    elif change == "not-compiling":
        world.kube.set_status(
            "kernels",
            NS,
            kernel["metadata"]["name"],
            {**world.kernel(kernel["metadata"]["name"])["status"], "phase": "Pending"},
        )
    else:
        labels["esper.dev/kernel"] = "gone"
    writes, events = len(world.kube.writes), len(world.events)
    await world.rec.observe_pod(pod)
    assert (len(world.kube.writes), len(world.events)) == (writes, events)


# ---- which finished Jobs count ------------------------------------------------------------------------


async def test_a_running_job_is_not_read(world: World) -> None:
    _kernel, job = await compiling(world)
    writes = len(world.kube.writes)
    await world.rec.observe_job(world.job(job))
    running = world.kube.set_status(
        "jobs", COMPILE_NS, job, {"conditions": [{"type": "Complete", "status": "False"}]}
    )
    await world.rec.observe_job(running)
    unlabelled = world.succeed(job, "x")
    del unlabelled["metadata"]["labels"]["esper.dev/kernel"]
    await world.rec.observe_job(unlabelled)
    assert world.kube.writes[writes:] == []


async def test_a_finished_job_whose_kernel_is_gone_is_deleted(world: World) -> None:
    kernel, job = await compiling(world)
    del world.kube.objects[("kernels", NS, kernel["metadata"]["name"])]
    await world.rec.observe_job(world.fail(job))
    assert world.kube.names("jobs") == [] and world.kube.written("delete", "jobs")[-1].name == job


async def test_a_job_outside_the_compile_namespace_is_never_deleted(world: World) -> None:
    """Someone's Job in a tenant namespace that merely carries the labels is not the operator's to delete."""
    kernel, job = await compiling(world)
    stranger = {
        **world.job(job),
        "metadata": {"name": "copy", "labels": world.job(job)["metadata"]["labels"]},
    }
    world.kube.put("jobs", NS, stranger)
    del world.kube.objects[("kernels", NS, kernel["metadata"]["name"])]
    finished_job = world.kube.set_status(
        "jobs", NS, "copy", {"conditions": [{"type": "Failed", "status": "True"}]}
    )
    await world.rec.observe_job(finished_job)
    assert world.kube.written("delete") == []


async def test_a_finished_job_of_a_recreated_kernel_is_deleted_and_ignored(world: World) -> None:
    """The Kernel was deleted and made again (a new uid): the old Kernel's Job goes; the new Kernel
    is untouched."""
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    world.kube.objects[("kernels", NS, name)]["metadata"]["uid"] = "new-uid"
    world.kube.set_status("kernels", NS, name, {"phase": "Pending"})  # a new object: its own status
    before = world.kernel(name)["status"]
    await world.rec.observe_job(world.fail(job))
    assert world.kube.names("jobs") == []
    assert world.kernel(name)["status"] == before
    message = f"ignored Job esper/{job}: not the compile Job this Kernel recorded"
    assert world.kernel_events()[-1] == (name, "Warning", "ForeignJob", message)


async def test_the_kernel_namespace_defaults_to_the_jobs(world: World) -> None:
    """A Job without the kernel-namespace label names a Kernel in its own namespace."""
    kernel, _job = await compiling(world)
    name = kernel["metadata"]["name"]
    stranger = {"metadata": {"name": "j", "labels": {"esper.dev/kernel": name}}}
    world.kube.put("jobs", NS, stranger)
    finished_job = world.kube.set_status(
        "jobs", NS, "j", {"conditions": [{"type": "Failed", "status": "True"}]}
    )
    await world.rec.observe_job(finished_job)
    assert world.kernel_events()[-1][2] == "ForeignJob"  # found the Kernel in the Job's namespace


async def test_a_job_of_a_deleted_kernel_is_left_to_the_cleanup(world: World) -> None:
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    world.kube.objects[("kernels", NS, name)]["metadata"]["deletionTimestamp"] = "2026-11-26T10:00:00Z"
    writes, events = len(world.kube.writes), len(world.events)
    await world.rec.observe_job(world.fail(job))
    assert (len(world.kube.writes), len(world.events)) == (writes, events)


async def test_an_earlier_attempts_job_is_ignored_silently(tmp_path: Path) -> None:
    world = World(tmp_path)
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    world.fail(job)
    first = world.job(job)
    await world.rec.observe_job(first)
    past = {**world.kernel(name)["status"], "retryAt": "2020-01-01T00:00:00.000Z"}  # the back-off is over
    world.kube.set_status("kernels", NS, name, past)
    await world.rec.kernel_tick(world.kernel(name))  # attempt 2
    assert world.kernel(name)["status"]["jobName"] == world.job_of(kernel, 2)
    writes, events = len(world.kube.writes), len(world.events)
    await world.rec.observe_job(first)  # a late event of attempt 1's Job
    assert (len(world.kube.writes), len(world.events)) == (writes, events)


async def test_a_job_the_kernel_did_not_record_is_foreign(world: World) -> None:
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    world.kube.set_status("kernels", NS, name, {**world.kernel(name)["status"], "jobUid": "someone-else"})
    await world.rec.observe_job(world.fail(job))
    message = f"ignored Job esper/{job}: not the compile Job this Kernel recorded"
    assert world.kernel_events()[-1] == (name, "Warning", "ForeignJob", message)
    assert world.kernel(name)["status"]["phase"] == "Compiling"


async def test_a_kernel_without_a_recorded_job_finds_every_job_foreign(world: World) -> None:
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    world.kube.set_status("kernels", NS, name, {"phase": "Compiling"})
    await world.rec.observe_job(world.fail(job))
    assert world.kernel_events()[-1][2] == "ForeignJob"


async def test_a_result_already_carried_over_is_not_read_again(world: World) -> None:
    _kernel, job = await compiling(world)
    finished_job = world.fail(job, code=65)
    await world.rec.observe_job(finished_job)
    writes, events = len(world.kube.writes), len(world.events)
    await world.rec.observe_job(finished_job)
    assert (len(world.kube.writes), len(world.events)) == (writes, events)


async def test_a_retrying_kernel_waits_for_its_time(world: World) -> None:
    """Its failed Job's events keep coming while it backs off: they change nothing."""
    kernel, job = await compiling(world)
    finished_job = world.fail(job)
    await world.rec.observe_job(finished_job)
    assert world.kernel(kernel["metadata"]["name"])["status"]["reason"] == "RetryBackoff"
    writes, events = len(world.kube.writes), len(world.events)
    await world.rec.observe_job(finished_job)
    assert (len(world.kube.writes), len(world.events)) == (writes, events)


async def test_a_user_retry_pending_its_job_is_not_failed_again_by_the_old_job(world: World) -> None:
    kernel, job = await failed(world)
    name = kernel["metadata"]["name"]
    status = {**world.kernel(name)["status"], "phase": "Pending", "reason": "RetryRequested"}
    world.kube.set_status("kernels", NS, name, status)
    writes = len(world.kube.writes)
    await world.rec.observe_job(world.job(job))
    assert world.kube.writes[writes:] == [] and world.kernel(name)["status"]["phase"] == "Pending"


async def test_a_queued_kernels_old_job_is_still_read(world: World) -> None:
    """Pending for another reason than a retry (say, Queued) is not settled: the Job's result counts."""
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    status = {**world.kernel(name)["status"], "phase": "Pending", "reason": "Queued"}
    world.kube.set_status("kernels", NS, name, status)
    await world.rec.observe_job(world.fail(job, code=65))
    assert world.kernel(name)["status"]["phase"] == "Failed"


async def test_pods_not_created_by_the_job_are_named_and_ignored(world: World) -> None:
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    for i in range(6):
        world.kube.put("pods", COMPILE_NS, {"metadata": {"name": f"fake-{i}", "labels": {"job-name": job}},
                                            "status": {"phase": "Succeeded"}})  # fmt: skip
    await world.rec.observe_job(world.fail(job, code=65))
    message = (
        "ignored Pod(s) fake-0, fake-1, fake-2, fake-3, fake-4: labelled job-name="
        f"{job} but not created by that Job"
    )
    assert (name, "Warning", "ForeignPod", message) in world.kernel_events()
    assert world.kernel(name)["status"]["reason"] == "InvalidBlueprint"  # read from the Job's own Pod


async def test_a_complete_job_whose_pod_is_not_visible_yet_is_read_later(world: World) -> None:
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    complete = world.kube.set_status(
        "jobs", COMPILE_NS, job, {"conditions": [{"type": "Complete", "status": "True"}]}
    )
    writes, events = len(world.kube.writes), len(world.events)
    await world.rec.observe_job(complete)
    assert (len(world.kube.writes), len(world.events)) == (writes, events)
    assert world.kernel(name)["status"]["phase"] == "Compiling"


@pytest.mark.parametrize(
    ("conditions", "done"),
    [
        ([], False),
        ([{"type": "Complete", "status": "True"}], True),
        ([{"type": "Failed", "status": "True"}], True),
        ([{"type": "Failed", "status": "False"}], False),
        ([{"type": "Suspended", "status": "True"}], False),
        ([{"type": "Suspended", "status": "True"}, {"type": "Complete", "status": "True"}], True),
    ],
)
def test_a_job_has_finished_when_complete_or_failed(conditions: list[dict[str, str]], done: bool) -> None:
    assert finished({"status": {"conditions": conditions}}) is done
    assert finished({}) is False


# ---- keep-last-good rollouts ----------------------------------------------------------------------------


async def ready(world: World, name: str = "mlp", spec: dict[str, Any] | None = None) -> Body:
    """Reconcile Blueprint `name` (created or edited to `spec`) and run its new Kernel's Job to success."""
    world.blueprint(name, spec)
    await world.reconcile(name)
    kernel = world.kernel(kernel_name(spec or SPEC))
    key = kernel["spec"]["key"]
    await world.rec.observe_job(
        world.succeed(world.job_of(kernel), world.result(key, world.store_manifest(key)))
    )
    return world.kernel(kernel["metadata"]["name"])


def live_kernels(world: World) -> list[str]:
    """The Kernels not being deleted (a released Kernel waits for its finalizer)."""
    return [
        n for n in world.kube.names("kernels", NS) if not world.kernel(n)["metadata"].get("deletionTimestamp")
    ]


def role(world: World, kernel: str, blueprint: str = "mlp") -> str | None:
    return world.kernel(kernel)["metadata"]["labels"].get(f"blueprint.esper.dev/{blueprint}")


@pytest.mark.parametrize("first", [SPEC, SPEC_2], ids=["to-48", "to-32"])  # both orders of the names
async def test_an_edit_keeps_the_last_ready_kernel_serving_until_the_new_one_is_ready(
    world: World, first: dict[str, Any]
) -> None:
    second = SPEC_2 if first is SPEC else SPEC
    old = (await ready(world, spec=first))["metadata"]["name"]
    world.blueprint(spec=second)
    status = await world.reconcile()
    new = kernel_name(second)
    assert status["phase"] == "Compiling" and status["revision"] == 2
    assert status["serving"] == [{"target": "cpu", "name": old, "phase": "Ready"}]
    assert status["servingSummary"] == "1/1"
    assert status["history"] == [
        {"revision": 1, "digest": digest_of(first), "kernels": [{"target": "cpu", "name": old}]}
    ]
    assert (role(world, old), role(world, new)) == ("serving", "candidate")
    # the new Kernel Ready: it serves, the old one is kept as history
    key = key_of(second)
    writes = len(world.kube.writes)
    await world.rec.observe_job(
        world.succeed(world.job_of(world.kernel(new)), world.result(key, world.store_manifest(key)))
    )
    status = world.kube.peek("blueprints", NS, "mlp")["status"]  # type: ignore[index]
    assert status["serving"] == [{"target": "cpu", "name": new, "phase": "Ready"}]
    assert (role(world, old), role(world, new)) == ("retained", "serving")
    labels = [w for w in world.kube.writes[writes:] if w.verb == "patch" and "labels" in w.body["metadata"]]
    assert [w.name for w in labels] == [new, old]  # the new one serves before the old one stops
    assert ("Blueprint", "mlp", "Normal", "Ready", "all 1 Kernel(s) Ready") in world.events


async def test_a_rollback_serves_the_kept_kernel_at_once(world: World) -> None:
    old = (await ready(world))["metadata"]["name"]
    await ready(world, spec=SPEC_2)
    world.blueprint(spec=SPEC)
    status = await world.reconcile()
    assert status["phase"] == "Ready" and status["revision"] == 3
    assert status["serving"] == [{"target": "cpu", "name": old, "phase": "Ready"}]
    assert [h["revision"] for h in status["history"]] == [2]
    assert len(world.kube.written("create", "jobs")) == 2  # nothing compiled again


async def test_history_is_bounded_by_the_history_limit(world: World) -> None:
    specs = [mlp(h, historyLimit=1) for h in (24, 40, 56)]
    for spec in specs:
        await ready(world, spec=spec)
    status = world.kube.peek("blueprints", NS, "mlp")["status"]  # type: ignore[index]
    assert [h["kernels"][0]["name"] for h in status["history"]] == [kernel_name(specs[1])]
    # the Kernel that fell out of the history is released: this Blueprint held it alone
    assert live_kernels(world) == sorted(kernel_name(s) for s in specs[1:])


async def test_a_kernel_being_deleted_is_not_kept_in_the_history(world: World) -> None:
    old = (await ready(world))["metadata"]["name"]
    world.kube.objects[("kernels", NS, old)]["metadata"]["deletionTimestamp"] = "2026-11-26T10:00:00Z"
    world.blueprint(spec=SPEC_2)
    status = await world.reconcile()
    assert status["serving"] == [] and status["history"] == []


async def test_an_invalid_edit_keeps_the_last_good_revision(world: World) -> None:
    old = (await ready(world))["metadata"]["name"]
    before = world.kube.peek("blueprints", NS, "mlp")["status"]  # type: ignore[index]
    writes = len(world.kube.writes)
    world.blueprint(spec={"targets": ["cpu"]})  # neither template nor graph
    status = await world.reconcile()
    assert status["phase"] == "Invalid" and status["observedGeneration"] == 2
    message = status["message"]
    assert message and condition({"status": status}, "Valid") == {
        **condition({"status": status}, "Valid"),
        "status": "False",
        "reason": "InvalidSpec",
        "message": message,
    }
    kept = ("kernels", "kernelsReady", "kernelsTotal", "kernelsSummary", "digest", "revision", "serving",
            "servingSummary", "history")  # fmt: skip
    assert {k: status[k] for k in kept} == {k: before[k] for k in kept}
    assert [w for w in world.kube.writes[writes:]] == []  # nothing released, nothing relabelled
    assert role(world, old) == "serving"
    assert world.events[-1] == ("Blueprint", "mlp", "Warning", "Invalid", message)
    # the same error again is not repeated as an Event; another one is
    events = len(world.events)
    world.blueprint(spec={"targets": ["cpu"]})
    await world.reconcile()
    assert len(world.events) == events
    world.blueprint(spec={"targets": ["cpu"], "graph": {"inputs": [], "nodes": [], "outputs": []}})
    second = await world.reconcile()
    assert second["message"] != message and world.events[-1][3:] == ("Invalid", second["message"])


async def test_an_invalid_new_blueprint_has_nothing_to_keep(world: World) -> None:
    world.blueprint(spec={"targets": ["cpu"]})
    status = await world.reconcile()
    assert status["phase"] == "Invalid" and "serving" not in status and status["kernels"] == []
    assert world.kube.writes == []


async def test_keep_last_good_counts_a_blueprint_without_generation_as_one(world: World) -> None:
    status = await world.rec.keep_last_good({"metadata": {"name": "x", "namespace": NS}}, "bad")
    assert (status["observedGeneration"], status["message"]) == (1, "bad")


async def test_a_refused_blueprint_releases_its_kernels(world: World) -> None:
    """A Blueprint that cannot be processed at all (say, a name too long): Invalid, Kernels let go."""
    name = (await ready(world))["metadata"]["name"]
    body = world.kube.peek("blueprints", NS, "mlp")
    status = await world.rec.refuse_blueprint(body, "name too long")  # type: ignore[arg-type]
    assert (status["phase"], status["message"], status["kernels"], status["observedGeneration"]) == (
        "Invalid",
        "name too long",
        [],
        1,
    )
    assert "serving" not in status
    assert world.kernel(name)["metadata"].get("deletionTimestamp")  # its only owner let go
    assert world.events[-1] == ("Blueprint", "mlp", "Warning", "Invalid", "name too long")
    events = len(world.events)
    await world.rec.refuse_blueprint({**body, "status": status}, "name too long")  # type: ignore[dict-item]
    assert len(world.events) == events
    await world.rec.refuse_blueprint({**body, "status": status}, "other")  # type: ignore[dict-item]
    assert world.events[-1][4] == "other"


async def test_refusing_counts_a_blueprint_without_generation_as_one(world: World) -> None:
    status = await world.rec.refuse_blueprint({"metadata": {"name": "x", "namespace": NS, "uid": "u"}}, "bad")
    assert status["observedGeneration"] == 1


# ---- refreshing Blueprints from their Kernels -------------------------------------------------------


async def test_a_kernels_other_owners_are_not_refreshed(world: World) -> None:
    kernel, _job = await compiling(world)
    name = kernel["metadata"]["name"]
    owners = [{"kind": "ConfigMap", "name": "settings", "uid": "x"}, *kernel["metadata"]["ownerReferences"]]
    world.kube.objects[("kernels", NS, name)]["metadata"]["ownerReferences"] = owners
    world.kube.set_status("kernels", NS, name, {**world.kernel(name)["status"], "phase": "Ready"})
    await world.rec.refresh_blueprints(world.kernel(name))
    assert world.kube.peek("blueprints", NS, "mlp")["status"]["phase"] == "Ready"  # type: ignore[index]


@pytest.mark.parametrize("state", ["gone", "deleting", "invalid", "no-kernels"])
async def test_blueprints_that_cannot_be_refreshed_are_left_alone(world: World, state: str) -> None:
    """Blueprint a cannot take a refresh; b, which shares the Kernel, still gets its own."""
    kernel, _job = await compiling(world, "a")
    world.blueprint("b")
    await world.reconcile("b")
    name = kernel["metadata"]["name"]
    assert [o["name"] for o in world.kernel(name)["metadata"]["ownerReferences"]] == ["a", "b"]
    blueprint = world.kube.objects[("blueprints", NS, "a")]
    if state == "gone":
        del world.kube.objects[("blueprints", NS, "a")]
    elif state == "deleting":
        blueprint["metadata"]["deletionTimestamp"] = "2026-11-26T10:00:00Z"
    elif state == "invalid":
        blueprint["status"]["phase"] = "Invalid"
    else:
        blueprint["status"]["kernels"] = []
    world.kube.set_status("kernels", NS, name, {**world.kernel(name)["status"], "phase": "Ready"})
    writes = len(world.kube.writes)
    await world.rec.refresh_blueprints(world.kernel(name))
    assert [w.name for w in world.kube.writes[writes:] if w.plural == "blueprints"] == ["b"]
    assert world.kube.peek("blueprints", NS, "b")["status"]["phase"] == "Ready"  # type: ignore[index]


async def test_a_refresh_without_change_writes_nothing(world: World) -> None:
    kernel, _job = await compiling(world)
    writes, events = len(world.kube.writes), len(world.events)
    await world.rec.refresh_blueprints(world.kernel(kernel["metadata"]["name"]))
    assert (len(world.kube.writes), len(world.events)) == (writes, events)


async def test_a_refresh_keeps_the_observed_generation_and_history_limit(world: World) -> None:
    """The refresh writes what the Blueprint's last reconcile saw: its generation, its history limit."""
    specs = [mlp(h) for h in (24, 40, 56)]
    await ready(world, spec=specs[0])
    await ready(world, spec=specs[1])
    world.blueprint(spec=specs[2])
    await world.reconcile()
    assert len(world.kube.peek("blueprints", NS, "mlp")["status"]["history"]) == 2  # type: ignore[index]
    edited = world.kube.objects[("blueprints", NS, "mlp")]  # an edit not yet reconciled: generation 9
    edited["metadata"]["generation"], edited["spec"]["historyLimit"] = 9, 1
    kernel = world.kernel(kernel_name(specs[2]))
    key = kernel["spec"]["key"]
    await world.rec.observe_job(
        world.succeed(world.job_of(kernel), world.result(key, world.store_manifest(key)))
    )
    status = world.kube.peek("blueprints", NS, "mlp")["status"]  # type: ignore[index]
    assert status["observedGeneration"] == 3 and status["phase"] == "Ready"
    assert [h["kernels"][0]["name"] for h in status["history"]] == [kernel_name(specs[1])]
    assert kernel_name(specs[0]) not in live_kernels(world)


@pytest.mark.parametrize(("generation", "observed"), [(5, 5), (None, 1)])
async def test_a_refresh_of_a_status_without_generation_uses_the_blueprints(
    world: World, generation: int | None, observed: int
) -> None:
    _kernel, job = await compiling(world)
    blueprint = world.kube.objects[("blueprints", NS, "mlp")]
    del blueprint["status"]["observedGeneration"], blueprint["status"]["digest"]  # an older operator's
    if generation is None:
        del blueprint["metadata"]["generation"]
    else:
        blueprint["metadata"]["generation"] = generation
    key = key_of(SPEC)
    await world.rec.observe_job(world.succeed(job, world.result(key, world.store_manifest(key))))
    status = world.kube.peek("blueprints", NS, "mlp")["status"]  # type: ignore[index]
    assert (status["observedGeneration"], status["digest"], status["phase"]) == (observed, "", "Ready")


async def test_a_refresh_defaults_to_a_history_of_three(world: World) -> None:
    specs = [mlp(h, historyLimit=5) for h in (24, 32, 40, 48, 56)]
    for spec in specs[:4]:
        await ready(world, spec=spec)
    world.blueprint(spec=specs[4])
    await world.reconcile()
    assert len(world.kube.peek("blueprints", NS, "mlp")["status"]["history"]) == 4  # type: ignore[index]
    del world.kube.objects[("blueprints", NS, "mlp")]["spec"]["historyLimit"]  # back to the default
    kernel = world.kernel(kernel_name(specs[4]))
    key = kernel["spec"]["key"]
    await world.rec.observe_job(
        world.succeed(world.job_of(kernel), world.result(key, world.store_manifest(key)))
    )
    status = world.kube.peek("blueprints", NS, "mlp")["status"]  # type: ignore[index]
    assert [h["kernels"][0]["name"] for h in status["history"]] == [kernel_name(s) for s in specs[3:0:-1]]


# ---- deletion -------------------------------------------------------------------------------------------


async def test_a_deleted_blueprint_releases_its_kernels(world: World) -> None:
    old = (await ready(world))["metadata"]["name"]
    world.blueprint(spec=SPEC_2)
    await world.reconcile()
    new = kernel_name(SPEC_2)
    await world.rec.blueprint_deleted(world.kube.peek("blueprints", NS, "mlp"))  # type: ignore[arg-type]
    deleted = [w.name for w in world.kube.written("delete", "kernels")]
    assert deleted == sorted([old, new])
    for name in (old, new):
        assert world.kernel(name)["metadata"]["deletionTimestamp"]  # the finalizer cleans up first


async def test_a_deleted_blueprint_leaves_a_shared_kernel_to_the_other(world: World) -> None:
    name = (await ready(world, "a"))["metadata"]["name"]
    world.blueprint("b")
    await world.reconcile("b")
    await world.rec.blueprint_deleted(world.kube.peek("blueprints", NS, "a"))  # type: ignore[arg-type]
    kernel = world.kernel(name)
    assert kernel["metadata"]["ownerReferences"] == [owner(world, "b")]
    assert "blueprint.esper.dev/a" not in kernel["metadata"]["labels"]
    assert kernel["status"]["requesters"] == [{"blueprint": "b", "role": "serving"}]
    assert world.kube.written("delete", "kernels") == []


async def test_a_deleted_kernel_takes_its_jobs_and_keeps_its_bundle(world: World) -> None:
    kernel, job = await failed(world)
    name = kernel["metadata"]["name"]
    world.store_manifest(kernel["spec"]["key"])
    await world.rec.kernel_deleted(world.kernel(name))
    assert [(w.namespace, w.name) for w in world.kube.written("delete", "jobs")] == [(COMPILE_NS, job)]
    assert world.kube.names("jobs") == []
    assert (world.store_dir / "kernels" / kernel["spec"]["key"] / "manifest.json").is_file()


async def test_a_kernel_deleted_before_its_status_named_a_job_still_takes_it(world: World) -> None:
    kernel, _job = await compiling(world)
    name = kernel["metadata"]["name"]
    world.kube.set_status("kernels", NS, name, {})
    await world.rec.kernel_deleted(world.kernel(name))
    assert world.kube.names("jobs") == []


async def test_a_deleted_kernel_takes_the_job_its_status_names_and_the_first_attempts(world: World) -> None:
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    status = {**world.kernel(name)["status"], "jobName": "attempt-3", "jobNamespace": "elsewhere"}
    world.kube.set_status("kernels", NS, name, status)
    await world.rec.kernel_deleted(world.kernel(name))
    assert [(w.namespace, w.name) for w in world.kube.written("delete", "jobs")] == [
        ("elsewhere", "attempt-3"),
        (COMPILE_NS, job),
    ]


async def test_a_job_named_without_a_namespace_is_in_the_kernels(world: World) -> None:
    """An old status without jobNamespace: the Job ran beside its Kernel."""
    await world.rec.kernel_deleted(
        {"metadata": {"name": "k", "namespace": NS, "uid": "u"}, "status": {"jobName": "j"}}
    )
    assert [(w.namespace, w.name) for w in world.kube.written("delete", "jobs")] == [(NS, "j")]


async def test_retention_delete_removes_the_bundle_when_no_other_kernel_uses_it(tmp_path: Path) -> None:
    world = World(tmp_path, retention="delete")
    kernel = await ready(world)
    key = kernel["spec"]["key"]
    await world.rec.kernel_deleted(kernel)
    assert not (world.store_dir / "kernels" / key).exists()


@pytest.mark.parametrize("where", [NS, "other-team"])
async def test_retention_delete_keeps_a_bundle_another_kernel_uses(tmp_path: Path, where: str) -> None:
    world = World(tmp_path, retention="delete")
    kernel = await ready(world)
    key = kernel["spec"]["key"]
    world.kube.put("kernels", where, {"metadata": {"name": "copy"}, "spec": {"key": key}})
    await world.rec.kernel_deleted(kernel)
    assert (world.store_dir / "kernels" / key / "manifest.json").is_file()


async def test_retention_delete_ignores_kernels_of_other_keys_or_being_deleted(tmp_path: Path) -> None:
    world = World(tmp_path, retention="delete")
    kernel = await ready(world)
    key = kernel["spec"]["key"]
    world.kube.put("kernels", NS, {"metadata": {"name": "other"}, "spec": {"key": "0" * 64}})
    world.kube.put("kernels", NS, {"metadata": {"name": "bare"}})
    dying = {"metadata": {"name": "dying", "deletionTimestamp": "2026-11-26T10:00:00Z", "finalizers": ["f"]}}
    world.kube.put("kernels", NS, {**dying, "spec": {"key": key}})
    await world.rec.kernel_deleted(kernel)
    assert not (world.store_dir / "kernels" / key).exists()


async def test_retention_delete_in_a_namespaced_install_looks_in_its_namespace(tmp_path: Path) -> None:
    world = World(tmp_path, retention="delete")
    world.kube.cluster_list_forbidden = True
    kernel = await ready(world)
    key = kernel["spec"]["key"]
    world.kube.put("kernels", "other-team", {"metadata": {"name": "copy"}, "spec": {"key": key}})
    await world.rec.kernel_deleted(kernel)
    assert not (world.store_dir / "kernels" / key).exists()  # the other namespace is not visible


# ---- what operators of the operator see: crash points, metrics, logs ---------------------------------


async def test_each_crash_point_is_reached_at_its_step(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fault-injection tests arm these names: each must be passed where faults.POINTS says."""
    reached: list[str] = []
    monkeypatch.setattr("esper_operator.reconcile.crash_point", reached.append)
    kernel, job = await compiling(world)
    assert reached == [
        "plan",
        "kernel-created",
        "job-create",
        "job-created",
        "kernel-compiling",
        "blueprint-status",
    ]
    reached.clear()
    key = key_of(SPEC)
    await world.rec.observe_job(world.succeed(job, world.result(key, world.store_manifest(key))))
    assert reached == ["job-observed", "kernel-finishing", "kernel-finished", "blueprint-refresh"]
    reached.clear()
    world.blueprint("b")
    await world.reconcile("b")
    assert reached == ["plan", "kernel-adopted", "blueprint-status"]
    reached.clear()
    await world.rec.kernel_deleted(world.kernel(kernel["metadata"]["name"]))
    assert reached == ["kernel-cleanup"]


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_reconciles_and_created_jobs_are_counted(world: World) -> None:
    ok = counter("esper_reconciles_total", resource="blueprint", outcome="ok")
    invalid = counter("esper_reconciles_total", resource="blueprint", outcome="invalid")
    jobs = counter("esper_compile_jobs_created_total", target="cpu")
    await compiling(world)
    world.blueprint("bad", {"targets": ["cpu"]})
    await world.reconcile("bad")
    await world.rec.refuse_blueprint(world.kube.peek("blueprints", NS, "bad"), "refused")  # type: ignore[arg-type]
    assert counter("esper_reconciles_total", resource="blueprint", outcome="ok") == ok + 1
    assert counter("esper_reconciles_total", resource="blueprint", outcome="invalid") == invalid + 2
    assert counter("esper_compile_jobs_created_total", target="cpu") == jobs + 1


@pytest.mark.parametrize(
    ("times", "seconds"),
    [
        ({"startTime": STARTED, "completionTime": COMPLETED}, 42.0),
        ({"startTime": COMPLETED, "completionTime": STARTED}, 0.0),  # a skewed clock: not negative
        ({"startTime": STARTED}, 0.0),
        ({"completionTime": COMPLETED}, 0.0),
        ({"startTime": "yesterday", "completionTime": COMPLETED}, 0.0),
    ],
)
async def test_the_job_duration_is_observed_from_its_status(
    world: World, times: dict[str, str], seconds: float
) -> None:
    _kernel, job = await compiling(world)
    world.fail(job, code=65)
    status = {**world.job(job)["status"], **times}
    finished_job = world.kube.set_status("jobs", COMPILE_NS, job, status)
    total = counter("esper_compile_job_seconds_sum", target="cpu", outcome="failed")
    count = counter("esper_compile_job_seconds_count", target="cpu", outcome="failed")
    await world.rec.observe_job(finished_job)
    assert counter("esper_compile_job_seconds_sum", target="cpu", outcome="failed") - total == pytest.approx(
        seconds
    )
    assert counter("esper_compile_job_seconds_count", target="cpu", outcome="failed") == count + 1


async def test_the_log_says_why_a_job_or_bundle_was_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = World(tmp_path, retention="delete")
    caplog.set_level(logging.INFO, logger="esper.operator")
    kernel = await ready(world)
    name, key = kernel["metadata"]["name"], kernel["spec"]["key"]
    world.kube.put("kernels", "other", {"metadata": {"name": "copy"}, "spec": {"key": key}})
    await world.rec.kernel_deleted(kernel)
    assert caplog.messages[-1] == f"kept artifact {key[:16]} of Kernel {name}: still used by ['other/copy']"
    del world.kube.objects[("kernels", "other", "copy")]
    await world.rec.kernel_deleted(kernel)
    assert caplog.messages[-1] == f"deleted artifact of Kernel {name} (retention=delete)"
    kernel2, job = await compiling(world, "b", SPEC_2)
    del world.kube.objects[("kernels", NS, kernel2["metadata"]["name"])]
    await world.rec.observe_job(world.fail(job))
    assert caplog.messages[-1] == f"deleted compile Job esper/{job}: its Kernel is gone"


async def test_the_log_names_at_most_three_users_of_a_kept_bundle(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = World(tmp_path, retention="delete")
    caplog.set_level(logging.INFO, logger="esper.operator")
    kernel = await ready(world)
    for i in range(4):
        world.kube.put(
            "kernels", f"ns{i}", {"metadata": {"name": "copy"}, "spec": {"key": kernel["spec"]["key"]}}
        )
    await world.rec.kernel_deleted(kernel)
    assert caplog.messages[-1].endswith("still used by ['ns0/copy', 'ns1/copy', 'ns2/copy']")


# ---- generations, defaults and odd bodies --------------------------------------------------------------


def set_generation(world: World, name: str, generation: int | None) -> None:
    meta = world.kube.objects[("kernels", NS, name)]["metadata"]
    if generation is None:
        del meta["generation"]
    else:
        meta["generation"] = generation


@pytest.mark.parametrize(("generation", "observed"), [(3, 3), (None, 1)])
async def test_kernel_status_writes_carry_the_kernels_generation(
    tmp_path: Path, generation: int | None, observed: int
) -> None:
    """Every status write names the Kernel generation it saw (absent: 1), so `kubectl wait` trusts it."""
    world = World(tmp_path, max_concurrent_jobs=1)
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    set_generation(world, name, generation)
    await world.rec.observe_pod(waiting_pod(world, job, "ErrImagePull"))  # observe_pod
    await world.rec.observe_job(world.fail(job))  # _finish: a transient failure
    world.kube.set_status(
        "kernels", NS, name, {**world.kernel(name)["status"], "retryAt": "2020-01-01T00:00:00Z"}
    )
    await world.rec.kernel_tick(world.kernel(name))  # attempt 2
    await world.rec.observe_job(world.fail(world.job_of(kernel, 2), code=65))  # _finish: a permanent one
    world.kube.objects[("kernels", NS, name)]["metadata"]["annotations"] = {"esper.dev/retry": "r"}
    managed = {"app.kubernetes.io/managed-by": "esper-operator"}
    world.kube.put("jobs", COMPILE_NS, {"metadata": {"name": "busy", "labels": managed}})
    await world.rec.kernel_tick(world.kernel(name))  # the retry request, then queued behind "busy"
    world.kube.objects.pop(("jobs", COMPILE_NS, "busy"))
    await world.rec.kernel_tick(world.kernel(name))  # ensure_job
    generations = [w.body["observedGeneration"] for w in world.kube.written("patch_status", "kernels")]
    reasons = [w.body.get("reason") for w in world.kube.written("patch_status", "kernels")]
    expected = ["ErrImagePull", "RetryBackoff", "JobCreated", "InvalidBlueprint", "RetryRequested", "Queued"]
    assert reasons[1:] == [*expected, "JobCreated"]
    assert generations[1:] == [observed] * 7


async def test_a_failure_without_a_recorded_attempt_counts_as_the_first(tmp_path: Path) -> None:
    world = World(tmp_path, retry_base_seconds=100, retry_max_seconds=1000)
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    status = world.kernel(name)["status"]
    del status["attempts"]
    world.kube.set_status("kernels", NS, name, status)
    t0 = dt.datetime.now(dt.UTC)
    await world.rec.observe_job(world.fail(job))
    status = world.kernel(name)["status"]
    assert status["message"].startswith("attempt 1 failed (BackoffLimitExceeded: ")
    assert t0 + dt.timedelta(seconds=50) - dt.timedelta(milliseconds=1) <= _at(status["retryAt"])
    assert _at(status["retryAt"]) <= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=100)


async def test_a_failed_kernel_without_a_retry_request_is_left_alone(world: World) -> None:
    kernel, _job = await failed(world)
    writes = len(world.kube.writes)
    await world.rec.kernel_tick(kernel)
    assert world.kube.writes[writes:] == []


async def test_a_blueprint_without_a_spec_is_invalid(world: World) -> None:
    body = world.blueprint()
    del body["spec"]
    status = await world.rec.reconcile_blueprint(body)
    assert status["phase"] == "Invalid" and world.kube.writes == []


async def test_an_artifact_uri_with_a_trailing_slash_is_not_the_stores(world: World) -> None:
    """The store records bundles at exactly bundle_uri(key): another spelling is another place."""
    kernel, job = await compiling(world)
    key = key_of(SPEC)
    result = world.result(key, world.store_manifest(key), uri=world.uri(key) + "/")
    await world.rec.observe_job(world.succeed(job, result))
    status = world.kernel(kernel["metadata"]["name"])["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "BadResult")
    assert status["message"] == f"artifact URI {world.uri(key)}/ is outside the store"


async def test_a_burst_of_blueprints_is_planned_a_few_dozen_at_a_time(world: World) -> None:
    """At most 32 reconciles run at once; the others wait their turn and then complete."""
    import asyncio

    gate = asyncio.Event()
    inside = 0
    most = 0
    create = world.kube.create

    async def slow_create(plural: str, namespace: str, body: Body) -> Body:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        await gate.wait()
        inside -= 1
        return await create(plural, namespace, body)

    world.kube.create = slow_create  # type: ignore[method-assign]
    bodies = [world.blueprint(f"bp{i}", mlp(8 + i)) for i in range(40)]
    tasks = [asyncio.create_task(world.rec.reconcile_blueprint(b)) for b in bodies]
    deadline = asyncio.get_running_loop().time() + 10
    while inside < 32 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0)
    for _ in range(50):  # give any that would wrongly start the chance to
        await asyncio.sleep(0)
    assert (inside, most) == (32, 32)
    gate.set()
    statuses = await asyncio.gather(*tasks)
    assert [s["phase"] for s in statuses] == ["Compiling"] * 40 and most == 32


async def test_the_owner_reference_names_the_blueprints_own_api_version(world: World) -> None:
    """A Blueprint read at another served version is owned under that version, as the API server has it."""
    body = world.blueprint()
    body["apiVersion"] = "esper.dev/v1beta1"
    await world.rec.reconcile_blueprint(body)
    [ref] = world.kernel(kernel_name(SPEC))["metadata"]["ownerReferences"]
    assert ref == {**owner(world), "apiVersion": "esper.dev/v1beta1"}


async def test_a_refused_blueprint_says_which_generation_was_refused(world: World) -> None:
    body = world.blueprint(generation=4)
    status = await world.rec.refuse_blueprint(body, "refused")
    assert (
        status["observedGeneration"] == 4
        and condition({"status": status}, "Valid")["observedGeneration"] == 4
    )


async def test_a_compiling_kernel_whose_job_vanished_queues_for_a_new_one(tmp_path: Path) -> None:
    """Someone deleted the Job while every slot is taken: the Blueprint shows its Kernel waiting."""
    world = World(tmp_path, max_concurrent_jobs=1)
    kernel, job = await compiling(world)
    world.kube.objects.pop(("jobs", COMPILE_NS, job))
    labels = {"app.kubernetes.io/managed-by": "esper-operator"}
    world.kube.put("jobs", COMPILE_NS, {"metadata": {"name": "busy", "labels": labels}})
    status = await world.reconcile()
    assert status["kernels"] == [{"target": "cpu", "name": kernel["metadata"]["name"], "phase": "Pending"}]
    assert world.kernel(kernel["metadata"]["name"])["status"]["reason"] == "Queued"


async def test_each_attempt_removes_the_one_before(world: World) -> None:
    """Attempt 3 starts in Job `-3` and removes attempt 2's; attempt 1's went when 2 started."""
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    for attempt in (1, 2):
        await world.rec.observe_job(world.fail(world.job_of(kernel, attempt)))
        past = {**world.kernel(name)["status"], "retryAt": "2020-01-01T00:00:00.000Z"}
        world.kube.set_status("kernels", NS, name, past)
        await world.rec.kernel_tick(world.kernel(name))
        assert world.kube.names("jobs", COMPILE_NS) == [world.job_of(kernel, attempt + 1)]
    deleted = [w.name for w in world.kube.written("delete", "jobs")]
    assert deleted == [job, world.job_of(kernel, 2)]
    assert world.kernel(name)["status"]["attempts"] == 3


async def test_a_job_deleted_while_compiling_is_made_again_and_recorded(world: World) -> None:
    """Someone deleted the compile Job: the next pass makes it again and the Kernel records its uid,
    so the new Job's result is not taken for a stranger's."""
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    old_uid = world.job(job)["metadata"]["uid"]
    world.kube.objects.pop(("jobs", COMPILE_NS, job))
    await world.reconcile()
    new_uid = world.job(job)["metadata"]["uid"]
    assert new_uid != old_uid and world.kernel(name)["status"]["jobUid"] == new_uid
    assert world.kernel(name)["status"]["attempts"] == 1  # the same attempt, not a retry
    await world.rec.observe_job(world.fail(job, code=65))
    assert world.kernel(name)["status"]["phase"] == "Failed"


@pytest.mark.parametrize("spec", [{"target": "cpu"}, {"key": "a" * 64}, {}])
async def test_a_malformed_kernel_is_still_cleaned_up(world: World, spec: dict[str, str]) -> None:
    """A Kernel missing its target or key must not fail its own finalizer forever: the Job its
    status names goes; no other name can be derived."""
    kernel = {
        "metadata": {"name": "k", "namespace": NS, "uid": "u"},
        "spec": spec,
        "status": {"jobName": "j"},
    }
    await world.rec.kernel_deleted(kernel)
    assert [(w.namespace, w.name) for w in world.kube.written("delete", "jobs")] == [(NS, "j")]


@pytest.mark.parametrize(("generation", "observed"), [(3, 3), (None, 1)])
async def test_the_ready_write_carries_the_kernels_generation(
    world: World, generation: int | None, observed: int
) -> None:
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    set_generation(world, name, generation)
    key = key_of(SPEC)
    await world.rec.observe_job(world.succeed(job, world.result(key, world.store_manifest(key))))
    status = world.kernel(name)["status"]
    assert (status["phase"], status["observedGeneration"]) == ("Ready", observed)
    assert condition(world.kernel(name), "Ready")["observedGeneration"] == observed


async def test_a_user_retry_after_the_automatic_ones_counts_them(tmp_path: Path) -> None:
    """Two attempts failed (one automatic retry): the request says so, and the next Job is attempt 3."""
    world = World(tmp_path, retry_limit=1)
    kernel, job = await compiling(world)
    name = kernel["metadata"]["name"]
    await world.rec.observe_job(world.fail(job))
    world.kube.set_status(
        "kernels", NS, name, {**world.kernel(name)["status"], "retryAt": "2020-01-01T00:00:00Z"}
    )
    await world.rec.kernel_tick(world.kernel(name))
    await world.rec.observe_job(world.fail(world.job_of(kernel, 2)))
    status = world.kernel(name)["status"]
    assert (status["phase"], status["attempts"]) == ("Failed", 2)  # out of automatic retries
    world.kube.objects[("kernels", NS, name)]["metadata"]["annotations"] = {"esper.dev/retry": "again"}
    await world.rec.kernel_tick(world.kernel(name))
    [request] = [
        w.body for w in world.kube.written("patch_status") if w.body.get("reason") == "RetryRequested"
    ]
    assert (request["message"], request["retryBase"]) == (
        "retry requested after 2 attempt(s): BackoffLimitExceeded",
        2,
    )
    status = world.kernel(name)["status"]
    assert (status["phase"], status["attempts"], status["jobName"]) == (
        "Compiling",
        3,
        world.job_of(kernel, 3),
    )
    # the automatic retries start over: attempt 3's transient failure is retried
    await world.rec.observe_job(world.fail(world.job_of(kernel, 3)))
    assert world.kernel(name)["status"]["reason"] == "RetryBackoff"


async def test_a_refresh_writes_a_kernels_new_phase_when_the_blueprints_stays(world: World) -> None:
    """Two targets compiling; one backs off: the Blueprint stays Compiling but lists that Kernel Pending."""
    spec = {**SPEC, "targets": ["cpu", "cuda-sm90"]}
    world.blueprint(spec=spec)
    await world.reconcile()
    plan = plan_blueprint("mlp", spec, torch_version="2.13.0")
    cpu, gpu = (world.kernel(k.name) for k in plan.kernels)
    await world.rec.observe_job(world.fail(world.job_of(cpu)))
    status = world.kube.peek("blueprints", NS, "mlp")["status"]  # type: ignore[index]
    assert status["phase"] == "Compiling"
    assert status["kernels"] == [
        {"target": "cpu", "name": cpu["metadata"]["name"], "phase": "Pending"},
        {"target": "cuda-sm90", "name": gpu["metadata"]["name"], "phase": "Compiling"},
    ]


async def _edited_with_history_limit(world: World, limit: int) -> tuple[str, str]:
    """Revision 1 (Kernel old) Ready, then revision 2 (Kernel new), both with `historyLimit: limit`."""
    old = (await ready(world, spec=mlp(32, historyLimit=limit)))["metadata"]["name"]
    world.blueprint(spec=mlp(48, historyLimit=limit))
    await world.reconcile()
    return old, kernel_name(mlp(48, historyLimit=limit))


async def test_a_refresh_drops_a_served_kernel_that_is_being_deleted(world: World) -> None:
    """No history kept (limit 0): the old Kernel serves alone until someone deletes it; then nothing does."""
    old, new = await _edited_with_history_limit(world, 0)
    status = world.kube.peek("blueprints", NS, "mlp")["status"]  # type: ignore[index]
    assert status["serving"] == [{"target": "cpu", "name": old, "phase": "Ready"}] and status["history"] == []
    world.kube.objects[("kernels", NS, old)]["metadata"]["deletionTimestamp"] = "2026-11-26T10:00:00Z"
    await world.rec.refresh_blueprints(world.kernel(new))
    status = world.kube.peek("blueprints", NS, "mlp")["status"]  # type: ignore[index]
    assert (status["serving"], status["servingSummary"]) == ([], "0/1")


async def test_a_refresh_drops_a_retained_kernel_that_is_being_deleted(world: World) -> None:
    old, new = await _edited_with_history_limit(world, 3)
    key = key_of(mlp(48, historyLimit=3))
    await world.rec.observe_job(
        world.succeed(world.job_of(world.kernel(new)), world.result(key, world.store_manifest(key)))
    )
    status = world.kube.peek("blueprints", NS, "mlp")["status"]  # type: ignore[index]
    assert [h["kernels"][0]["name"] for h in status["history"]] == [old]
    world.kube.objects[("kernels", NS, old)]["metadata"]["deletionTimestamp"] = "2026-11-26T10:00:00Z"
    await world.rec.refresh_blueprints(world.kernel(new))
    assert world.kube.peek("blueprints", NS, "mlp")["status"]["history"] == []  # type: ignore[index]


async def test_a_failure_is_written_in_one_status_patch(world: World) -> None:
    """The patch names the Job it read, so the status stands on its own."""
    _kernel, job = await compiling(world)
    await world.rec.observe_job(world.fail(job, code=65))
    [body] = [
        w.body for w in world.kube.written("patch_status", "kernels") if w.body.get("phase") == "Failed"
    ]
    message = "compile Job failed (BackoffLimitExceeded) after 1 attempt(s); exit code 65; boom"
    expected = {
        "phase": "Failed",
        "reason": "InvalidBlueprint",
        "message": message,
        "observedGeneration": 1,
        "jobName": job,
    }
    assert {k: v for k, v in body.items() if k != "conditions"} == expected
    assert [(c["type"], c["status"], c["reason"]) for c in body["conditions"]] == [
        ("Ready", "False", "InvalidBlueprint")
    ]


async def test_a_back_off_is_written_in_one_status_patch(world: World) -> None:
    _kernel, job = await compiling(world)
    await world.rec.observe_job(world.fail(job))
    [body] = [
        w.body
        for w in world.kube.written("patch_status", "kernels")
        if w.body.get("reason") == "RetryBackoff"
    ]
    assert sorted(body) == [
        "conditions",
        "jobName",
        "message",
        "observedGeneration",
        "phase",
        "reason",
        "retryAt",
    ]
    assert (body["phase"], body["jobName"], body["observedGeneration"]) == ("Pending", job, 1)


async def test_a_new_blueprint_costs_no_reads(world: World) -> None:
    """Everything its rollout needs it has just written: the API server is the bottleneck of a burst."""
    world.blueprint()
    await world.reconcile()
    assert world.kube.reads == []
    assert [(w.verb, w.plural) for w in world.kube.writes] == [
        ("create", "kernels"),
        ("create", "jobs"),
        ("patch_status", "kernels"),
    ]


async def test_a_kernel_that_is_gone_shows_as_pending(world: World) -> None:
    """Deleted behind the operator's back, a Kernel is listed Pending until a reconcile makes it again."""
    spec = {**SPEC, "targets": ["cpu", "cuda-sm90"]}
    world.blueprint(spec=spec)
    await world.reconcile()
    cpu, gpu = (k.name for k in plan_blueprint("mlp", spec, torch_version="2.13.0").kernels)
    del world.kube.objects[("kernels", NS, gpu)]
    await world.rec.observe_job(world.fail(world.job_of(world.kernel(cpu)), code=65))
    status = world.kube.peek("blueprints", NS, "mlp")["status"]  # type: ignore[index]
    assert status["kernels"] == [
        {"target": "cpu", "name": cpu, "phase": "Failed"},
        {"target": "cuda-sm90", "name": gpu, "phase": "Pending"},
    ]


class RacedJob(FakeKube):
    """Another operator replica creates the compile Job right after this one first looked for it."""

    async def get_job(self, namespace: str, name: str) -> Body | None:
        job = await super().get_job(namespace, name)
        if job is None and not getattr(self, "raced", False):
            self.raced = True
            kernel = next(o for (p, _, _), o in self.objects.items() if p == "kernels")
            labels = {
                "app.kubernetes.io/managed-by": "esper-operator",
                "esper.dev/kernel-uid": kernel["metadata"]["uid"],
            }
            self.put("jobs", namespace, {"metadata": {"name": name, "labels": labels}})
        return job


async def test_with_a_cap_a_job_made_by_a_concurrent_pass_is_adopted_not_queued(tmp_path: Path) -> None:
    """It holds the only slot: it must be found as this Kernel's Job, not counted against it."""
    world = World(tmp_path, max_concurrent_jobs=1)
    world.kube = world.rec.kube = RacedJob()  # type: ignore[assignment]
    world.blueprint()
    await world.reconcile()
    kernel = world.kernel(kernel_name(SPEC))
    status = kernel["status"]
    assert (status["phase"], status["jobName"]) == ("Compiling", world.job_of(kernel))
    assert status["jobUid"] == world.job(world.job_of(kernel))["metadata"]["uid"]
    assert world.kube.written("create", "jobs") == []


async def test_a_reconcile_keeps_when_the_blueprints_conditions_last_changed(world: World) -> None:
    """`kubectl describe` shows since when a Blueprint is Valid and not Ready: a resync must not reset it."""
    world.blueprint()
    await world.reconcile()
    stored = world.kube.objects[("blueprints", NS, "mlp")]
    for c in stored["status"]["conditions"]:
        c["lastTransitionTime"] = "2026-01-01T00:00:00Z"
    status = await world.reconcile()
    assert {c["type"]: c["lastTransitionTime"] for c in status["conditions"]} == {
        "Valid": "2026-01-01T00:00:00Z",
        "Ready": "2026-01-01T00:00:00Z",
    }
