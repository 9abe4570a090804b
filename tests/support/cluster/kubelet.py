"""A fake kubelet + job controller: runs batch/v1 Jobs of the emulated cluster as local processes.

The emulator stores Jobs but nothing runs them. `FakeKubelet` polls the Jobs through the API and,
for each new one, creates a Pod (labels, ownerReference), runs the pod template's FIRST container's
`command` + `args` as a local subprocess and reports Pod and Job status through the /status
subresource, the way the job controller and kubelet of Kubernetes 1.31+ would.

Mirrored: env (value, secretKeyRef, configMapKeyRef, fieldRef, envFrom), the termination message
(`ESPER_RESULT_PATH` stands in for /dev/termination-log; FallbackToLogsOnError), backoffLimit (a
new Pod per attempt), podFailurePolicy onExitCodes (FailJob, Ignore, Count), activeDeadlineSeconds,
`spec.suspend`, Job conditions (SuccessCriteriaMet/Complete, FailureTarget/Failed), pod logs.

Not mirrored (documented gaps): images (only `command` runs; no image entrypoint), volumes and
mounts, resources/OOM (inject with `fail_next`), `workingDir` (a temp dir is the cwd), completions
or parallelism above 1, retry back-off delays (retries start at once), restartPolicy OnFailure
(a new Pod, not a restarted container), and ttlSecondsAfterFinished (ignored: finished Jobs stay
until deleted). `activeDeadlineSeconds` counts from the first Pod's start. onPodConditions rules
match only the DisruptionTarget condition that `disrupt_next` (eviction, deletion) sets.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import now_iso, wait_for
from .client import ApiError
from .server import Cluster

JSON = dict[str, Any]
RESULT_CAP = 4096  # bytes of termination message Kubernetes keeps
LOG_FALLBACK_LINES, LOG_FALLBACK_BYTES = 80, 2048  # FallbackToLogsOnError: the smaller of the two
MAX_ATTEMPTS = 100  # a guard against endless "Ignore" rules


@dataclass
class Fault:
    """An injected container failure: the next matching Pod exits with it without running."""

    prefix: str
    exit_code: int
    reason: str
    message: str
    times: int


@dataclass
class Disruption:
    """An injected disruption of the next matching running Pod (see `FakeKubelet.disrupt_next`)."""

    prefix: str
    how: str  # "evict", "evict-unmarked", "delete"
    times: int


DISRUPTION_CONDITION = {
    "type": "DisruptionTarget",
    "status": "True",
    "reason": "TerminationByKubelet",
    "message": "The node was low on resource: memory.",
}


@dataclass
class PodRun:
    """What one Pod did, for assertions (`kubelet.runs`)."""

    job: str
    namespace: str
    pod: str
    argv: list[str]
    env: dict[str, str]
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    output: str = ""


@dataclass
class _JobState:
    uid: str
    namespace: str
    name: str
    started: bool = False
    finished: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    disrupted: bool = False  # the last Pod carries a DisruptionTarget condition
    thread: threading.Thread | None = None


class _MissingRef(Exception):
    """A secret/configmap an env var needs is absent: the container cannot be created yet."""


class FakeKubelet:
    """Runs the cluster's Jobs as subprocesses. Start with `start()`, stop with `stop()`.

    Knobs: `paused` (Jobs are accepted but not started), `max_parallel` (running Jobs at once),
    `fail_next(prefix, ...)` (fault injection), `command_hook(job, container) -> argv | None`
    (replace a command), `extra_env` (added to every container's environment, e.g. a moto URL),
    `volume_dirs` (volume name -> host directory, e.g. a node's warm cache shared by Pods).

    Volumes: a process cannot be given a mount namespace here, so each `volumeMount` is emulated by
    rewriting its `mountPath` prefix in the container's env values and args to a host directory
    (`volume_dirs[name]`, else a fresh per-Pod directory, as an emptyDir is).
    """

    def __init__(
        self,
        cluster: Cluster,
        workdir: Path | None = None,
        *,
        max_parallel: int = 2,
        poll_interval: float = 0.05,
        extra_env: Mapping[str, str] | None = None,
        node_name: str = "fake-node",
    ) -> None:
        self.cluster = cluster
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="fake-kubelet-"))
        self.max_parallel = max_parallel
        self.poll_interval = poll_interval
        self.extra_env = dict(extra_env or {})
        self.volume_dirs: dict[str, Path] = {}
        self.node_name = node_name
        self.paused = False
        self.command_hook: Callable[[JSON, JSON], list[str] | None] | None = None
        self.runs: list[PodRun] = []
        self.errors: list[str] = []
        self._faults: list[Fault] = []
        self._disruptions: list[Disruption] = []
        self._jobs: dict[str, _JobState] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- control -------------------------------------------------------------------------

    def start(self) -> FakeKubelet:
        self._thread = threading.Thread(target=self._loop, name="fake-kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            states = list(self._jobs.values())
        for state in states:
            state.cancelled.set()
        for state in states:
            if state.thread is not None:
                state.thread.join(10)
        if self._thread is not None:
            self._thread.join(10)

    def fail_next(
        self,
        job_name_prefix: str,
        exit_code: int = 137,
        reason: str = "OOMKilled",
        message: str = "",
        times: int = 1,
    ) -> None:
        """Make the next `times` Pods of Jobs named `job_name_prefix*` fail like this, without running."""
        with self._lock:
            self._faults.append(Fault(job_name_prefix, exit_code, reason, message, times))

    def disrupt_next(self, job_name_prefix: str, how: str = "evict", times: int = 1) -> None:
        """Stop the next `times` Pods of Jobs named `job_name_prefix*` while they run.

        `evict`: node-pressure eviction as Kubernetes 1.26+ does it: phase Failed, reason Evicted, and a
        DisruptionTarget condition (a podFailurePolicy may Ignore it). `evict-unmarked`: the same
        without the condition (older clusters), so it counts towards backoffLimit. `delete`: the Pod
        is deleted through the API (`kubectl delete pod`); the killed container counts as a failure.
        """
        if how not in ("evict", "evict-unmarked", "delete"):
            raise ValueError(f"unknown disruption {how!r}")
        with self._lock:
            self._disruptions.append(Disruption(job_name_prefix, how, times))

    def wait_idle(self, timeout: float = 30) -> None:
        """Wait until every Job seen so far has finished (or been deleted)."""

        def idle() -> bool:
            with self._lock:
                return all(s.finished or s.cancelled.is_set() for s in self._jobs.values())

        wait_for(idle, timeout)

    def seen_jobs(self) -> list[str]:
        """Names of the Jobs the kubelet has picked up (started or not)."""
        with self._lock:
            return [s.name for s in self._jobs.values()]

    def runs_of(self, job_name: str) -> list[PodRun]:
        with self._lock:
            return [r for r in self.runs if r.job == job_name]

    # ---- the controller loop -----------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception as exc:  # keep running: a transient API error must not kill the kubelet
                self.errors.append(repr(exc))
            self._stop.wait(self.poll_interval)

    def _sync(self) -> None:
        assert self.cluster.rest is not None
        jobs = self.cluster.rest.list("jobs.batch/v1")
        seen = {job["metadata"]["uid"]: job for job in jobs}
        with self._lock:
            for uid, state in self._jobs.items():
                if uid not in seen and not state.cancelled.is_set():
                    state.cancelled.set()  # deleted while running: kill its process
            for uid, job in seen.items():
                if uid not in self._jobs:
                    meta = job["metadata"]
                    state = _JobState(uid, meta["namespace"], meta["name"])
                    state.finished = _finished(job)  # pre-existing finished Jobs are left alone
                    self._jobs[uid] = state
            running = sum(
                1 for s in self._jobs.values() if s.started and not s.finished and not s.cancelled.is_set()
            )
            for uid, state in self._jobs.items():
                if state.started or state.finished or state.cancelled.is_set():
                    continue
                if self.paused or running >= self.max_parallel or seen[uid]["spec"].get("suspend"):
                    continue
                state.started = True
                running += 1
                state.thread = threading.Thread(
                    target=self._run_job, args=(state,), daemon=True, name=f"job-{state.name}"
                )
                state.thread.start()

    # ---- one Job -------------------------------------------------------------------------------

    def _run_job(self, state: _JobState) -> None:
        try:
            self._run_job_attempts(state)
        except ApiError as exc:
            if exc.status != 404:  # 404: the Job went away under us
                self.errors.append(f"{state.name}: {exc!r}")
        except Exception as exc:
            self.errors.append(f"{state.name}: {exc!r}")
        finally:
            state.finished = True

    def _run_job_attempts(self, state: _JobState) -> None:
        rest = self.cluster.rest
        assert rest is not None
        job = rest.get("jobs.batch/v1", state.name, state.namespace)
        if job is None or job["metadata"]["uid"] != state.uid:
            return
        spec = job["spec"]
        backoff_limit = int(spec.get("backoffLimit", 6))
        deadline = spec.get("activeDeadlineSeconds")
        started_at = time.monotonic()
        deadline_at = started_at + float(deadline) if deadline else None
        status: JSON = {"startTime": now_iso(), "active": 1, "ready": 0}
        self._job_status(state, status)
        failed = 0
        for _ in range(MAX_ATTEMPTS):
            outcome = self._run_pod(state, job, deadline_at)
            if state.cancelled.is_set():
                return
            if outcome == "deadline":
                failed += 1
                self._fail(
                    state, status, failed, "DeadlineExceeded", "Job was active longer than specified deadline"
                )
                return
            code, container = outcome
            if code == 0:
                msg = "Reached expected number of succeeded pods"
                status.update(
                    active=None,
                    ready=0,
                    succeeded=1,
                    completionTime=now_iso(),
                    conditions=_conditions(
                        ("SuccessCriteriaMet", "CompletionsReached", msg),
                        ("Complete", "CompletionsReached", msg),
                    ),
                )
                self._job_status(state, status)
                return
            action, index = _failure_policy_action(
                spec.get("podFailurePolicy"), container, code, disrupted=state.disrupted
            )
            if action == "Ignore":  # not counted towards backoffLimit, nor in status.failed
                continue
            failed += 1
            if action in ("FailJob", "FailIndex"):
                last_pod = self.runs_of(state.name)[-1].pod
                self._fail(
                    state,
                    status,
                    failed,
                    "PodFailurePolicy",
                    f"Container {container} for pod {state.namespace}/{last_pod} failed with exit code "
                    f"{code} matching FailJob rule at index {index}",
                )
                return
            if failed > backoff_limit:
                self._fail(
                    state,
                    status,
                    failed,
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit",
                )
                return
            status.update(failed=failed, active=1, ready=0)
            self._job_status(state, status)
        self._fail(
            state, status, failed, "BackoffLimitExceeded", "the fake kubelet's attempt cap was reached"
        )

    def _fail(self, state: _JobState, status: JSON, failed: int, reason: str, message: str) -> None:
        status.update(
            active=None,
            ready=0,
            failed=failed,
            conditions=_conditions(("FailureTarget", reason, message), ("Failed", reason, message)),
        )
        self._job_status(state, status)

    def _job_status(self, state: _JobState, status: JSON) -> None:
        assert self.cluster.rest is not None
        if not state.cancelled.is_set():
            self.cluster.rest.patch(
                "jobs.batch/v1", state.name, {"status": status}, state.namespace, status=True
            )

    # ---- one Pod -------------------------------------------------------------------------------

    def _run_pod(self, state: _JobState, job: JSON, deadline_at: float | None) -> tuple[int, str] | str:
        rest = self.cluster.rest
        assert rest is not None
        template = job["spec"].get("template", {})
        pod_spec = dict(template.get("spec", {}), nodeName=self.node_name)
        container = pod_spec.get("containers", [{}])[0]
        labels = dict(template.get("metadata", {}).get("labels") or {})
        labels.update(
            {
                "job-name": state.name,
                "batch.kubernetes.io/job-name": state.name,
                "controller-uid": state.uid,
                "batch.kubernetes.io/controller-uid": state.uid,
            }
        )
        pod = rest.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "generateName": f"{state.name}-",
                    "namespace": state.namespace,
                    "labels": labels,
                    "annotations": dict(template.get("metadata", {}).get("annotations") or {}),
                    "ownerReferences": [
                        {
                            "apiVersion": "batch/v1",
                            "kind": "Job",
                            "name": state.name,
                            "uid": state.uid,
                            "controller": True,
                            "blockOwnerDeletion": True,
                        }
                    ],
                },
                "spec": pod_spec,
            }
        )
        pod_name = pod["metadata"]["name"]
        run = PodRun(state.name, state.namespace, pod_name, [], {})
        with self._lock:
            self.runs.append(run)
        pod_started = now_iso()

        # Resolve env; a missing Secret keeps the Pod Pending (CreateContainerConfigError), as in k8s.
        while True:
            try:
                env = self._container_env(pod, container, pod_name)
                break
            except _MissingRef as exc:
                self._pod_status(
                    state,
                    pod_name,
                    {
                        "phase": "Pending",
                        "containerStatuses": [
                            {
                                "name": container.get("name", ""),
                                "ready": False,
                                "restartCount": 0,
                                "image": container.get("image", ""),
                                "imageID": "",
                                "state": {
                                    "waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}
                                },
                            }
                        ],
                    },
                )
                if state.cancelled.wait(0.1):
                    return 0, container.get("name", "")
                if deadline_at is not None and time.monotonic() > deadline_at:
                    return "deadline"
        run.env = env
        self._pod_status(
            state,
            pod_name,
            {
                "phase": "Running",
                "startTime": pod_started,
                "hostIP": "127.0.0.1",
                "podIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": pod_started}],
                "containerStatuses": [
                    {
                        "name": container.get("name", ""),
                        "ready": True,
                        "restartCount": 0,
                        "image": container.get("image", ""),
                        "imageID": "",
                        "started": True,
                        "state": {"running": {"startedAt": pod_started}},
                    }
                ],
            },
        )
        self._job_status(state, {"active": 1, "ready": 1})

        fault = self._take_fault(state.name)
        disruption = None if fault is not None else self._take_disruption(state.name)
        state.disrupted = disruption is not None and disruption.how == "evict"
        deadline_hit = False
        if disruption is not None:
            # Stopped while running: SIGKILL after the grace period, as the kubelet does.
            code, reason, message, output = 137, "Error", "", ""
            run.exit_code, run.reason = code, disruption.how
            if disruption.how == "delete":
                with contextlib.suppress(ApiError):
                    rest.delete("pods", pod_name, state.namespace)
                return code, container.get("name", "")
            evicted: JSON = {
                "phase": "Failed",
                "reason": "Evicted",
                "message": "The node was low on resource: memory.",
                "conditions": [dict(DISRUPTION_CONDITION, lastTransitionTime=now_iso())]
                if disruption.how == "evict"
                else [],
                "containerStatuses": [
                    {
                        "name": container.get("name", ""),
                        "ready": False,
                        "restartCount": 0,
                        "image": container.get("image", ""),
                        "imageID": "",
                        "started": False,
                        "state": {
                            "terminated": {
                                "exitCode": code,
                                "reason": reason,
                                "startedAt": pod_started,
                                "finishedAt": now_iso(),
                            }
                        },
                    }
                ],
            }
            self._pod_status(state, pod_name, evicted)
            return code, container.get("name", "")
        if fault is not None:
            code, reason, message, output = fault.exit_code, fault.reason, fault.message, ""
        else:
            argv = (self.command_hook(job, container) if self.command_hook else None) or [
                *container.get("command", []),
                *container.get("args", []),
            ]
            argv, env = self._mount(container, pod_name, list(argv), env)
            run.argv = list(argv)
            if not argv:
                code, reason, output = 128, "ContainerCannotRun", ""
                message = "the fake kubelet runs only `command`: this container has none (image entrypoint)"
            else:
                code, output, deadline_hit = self._exec(state, argv, env, pod_name, deadline_at)
                reason = "Completed" if code == 0 else "Error"
                message = self._termination_message(env, container, code, output)
        if state.cancelled.is_set():
            return code, container.get("name", "")
        self.cluster.set_pod_log(state.namespace, pod_name, output)
        run.exit_code, run.reason, run.message, run.output = code, reason, message, output
        terminated: JSON = {
            "exitCode": code,
            "reason": reason,
            "startedAt": pod_started,
            "finishedAt": now_iso(),
            "containerID": f"fake://{pod_name}",
        }
        if message:
            terminated["message"] = message
        pod_status: JSON = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "PodCompleted",
                    "lastTransitionTime": now_iso(),
                }
            ],
            "containerStatuses": [
                {
                    "name": container.get("name", ""),
                    "ready": False,
                    "restartCount": 0,
                    "image": container.get("image", ""),
                    "imageID": "",
                    "started": False,
                    "state": {"terminated": terminated},
                }
            ],
        }
        if deadline_hit:
            pod_status.update(
                reason="DeadlineExceeded",
                message="Pod was active on the node longer than the specified deadline",
            )
        self._pod_status(state, pod_name, pod_status)
        return "deadline" if deadline_hit else (code, container.get("name", ""))

    def _mount(
        self, container: JSON, pod_name: str, argv: list[str], env: dict[str, str]
    ) -> tuple[list[str], dict[str, str]]:
        """Emulate volumeMounts by rewriting mount paths in argv and env to host directories."""
        mounts = []
        for mount in container.get("volumeMounts") or []:
            host = self.volume_dirs.get(mount["name"])
            if host is None:
                host = Path(tempfile.mkdtemp(prefix=f"{pod_name}-{mount['name']}-", dir=self.workdir))
            Path(host).mkdir(parents=True, exist_ok=True)
            mounts.append((mount["mountPath"].rstrip("/"), str(host)))

        def rewrite(value: str) -> str:
            for path, host in mounts:
                if value == path or value.startswith(path + "/"):
                    return host + value[len(path) :]
            return value

        return [rewrite(a) for a in argv], {k: rewrite(v) for k, v in env.items()}

    def _exec(
        self, state: _JobState, argv: list[str], env: dict[str, str], pod_name: str, deadline_at: float | None
    ) -> tuple[int, str, bool]:
        """Run the process (never in an event loop); kill it on deadline or cancellation."""
        pod_dir = Path(tempfile.mkdtemp(prefix=f"{pod_name}-", dir=self.workdir))
        log_path = pod_dir / "output.log"
        deadline_hit = False
        with log_path.open("wb") as log:
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=pod_dir,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as exc:  # the "image" lacks the binary
                return 127, f"exec {argv[0]}: {exc}\n", False
            while True:
                try:
                    proc.wait(0.05)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if state.cancelled.is_set() or (deadline_at is not None and time.monotonic() > deadline_at):
                    deadline_hit = not state.cancelled.is_set()
                    _kill(proc)
                    break
        code = proc.returncode
        if code is not None and code < 0:
            code = 128 - code  # a signal: container runtimes report 128 + signal number
        return int(code if code is not None else 137), log_path.read_text(errors="replace"), deadline_hit

    @staticmethod
    def _termination_message(env: Mapping[str, str], container: JSON, code: int, output: str) -> str:
        path = Path(env["ESPER_RESULT_PATH"])
        message = path.read_bytes()[:RESULT_CAP].decode("utf-8", "replace") if path.exists() else ""
        policy = container.get("terminationMessagePolicy", "File")
        if not message.strip() and code != 0 and policy == "FallbackToLogsOnError":
            tail = "".join(output.splitlines(keepends=True)[-LOG_FALLBACK_LINES:])
            message = tail.encode()[-LOG_FALLBACK_BYTES:].decode("utf-8", "ignore")
        return message

    def _take_fault(self, job_name: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if job_name.startswith(fault.prefix) and fault.times > 0:
                    fault.times -= 1
                    if fault.times == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _take_disruption(self, job_name: str) -> Disruption | None:
        with self._lock:
            for disruption in self._disruptions:
                if job_name.startswith(disruption.prefix) and disruption.times > 0:
                    disruption.times -= 1
                    if disruption.times == 0:
                        self._disruptions.remove(disruption)
                    return disruption
        return None

    def _pod_status(self, state: _JobState, pod_name: str, status: JSON) -> None:
        assert self.cluster.rest is not None
        if state.cancelled.is_set():
            return
        with contextlib.suppress(ApiError):  # the Pod may be gone (Job deleted)
            self.cluster.rest.patch("pods", pod_name, {"status": status}, state.namespace, status=True)

    # ---- env ----------------------------------------------------------------------------------

    def _container_env(self, pod: JSON, container: JSON, pod_name: str) -> dict[str, str]:
        """The process env: a small base, `extra_env`, then the container's env as k8s resolves it."""
        namespace = pod["metadata"]["namespace"]
        result_dir = Path(tempfile.mkdtemp(prefix=f"{pod_name}-result-", dir=self.workdir))
        venv_bin = str(Path(sys.executable).parent)
        env = {
            "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(result_dir),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "HOSTNAME": pod_name,
        }
        env.update(self.extra_env)
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                data = self._read("secrets", source["secretRef"], namespace, decode=True)
            else:
                data = self._read("configmaps", source.get("configMapRef", {}), namespace, decode=False)
            env.update({prefix + k: v for k, v in (data or {}).items()})
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = str(var["value"])
            elif "valueFrom" in var:
                value = self._value_from(var["valueFrom"], pod, namespace)
                if value is not None:
                    env[var["name"]] = value
            else:
                env[var["name"]] = ""
        env["ESPER_RESULT_PATH"] = str(result_dir / "termination-log")  # stands in for /dev/termination-log
        return env

    def _value_from(self, source: JSON, pod: JSON, namespace: str) -> str | None:
        if "secretKeyRef" in source or "configMapKeyRef" in source:
            secret = "secretKeyRef" in source
            ref = source["secretKeyRef" if secret else "configMapKeyRef"]
            data = self._read("secrets" if secret else "configmaps", ref, namespace, decode=secret)
            if data is None:
                return None
            if ref["key"] not in data:
                if ref.get("optional"):
                    return None
                raise _MissingRef(
                    f"couldn't find key {ref['key']} in {'Secret' if secret else 'ConfigMap'} "
                    f"{namespace}/{ref['name']}"
                )
            return data[ref["key"]]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            meta = pod["metadata"]
            simple = {
                "metadata.name": meta["name"],
                "metadata.namespace": namespace,
                "metadata.uid": meta["uid"],
                "spec.nodeName": self.node_name,
                "status.podIP": "127.0.0.1",
                "status.hostIP": "127.0.0.1",
                "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
            }
            if path in simple:
                return simple[path]
            for kind in ("labels", "annotations"):
                if path.startswith(f"metadata.{kind}['"):
                    return (meta.get(kind) or {}).get(path.split("'")[1], "")
            raise _MissingRef(f"unsupported fieldRef {path}")
        return None  # resourceFieldRef: not emulated

    def _read(
        self, resource: str, ref: Mapping[str, Any], namespace: str, decode: bool
    ) -> dict[str, str] | None:
        assert self.cluster.rest is not None
        obj = self.cluster.rest.get(resource, ref.get("name", ""), namespace)
        if obj is None:
            if ref.get("optional"):
                return None
            kind = "secret" if resource == "secrets" else "configmap"
            raise _MissingRef(f'{kind} "{ref.get("name")}" not found')
        data = (
            {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            if decode
            else dict(obj.get("data") or {})
        )
        data.update(obj.get("stringData") or {})
        return data


def _finished(job: JSON) -> bool:
    return any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in (job.get("status") or {}).get("conditions") or []
    )


def _conditions(*items: tuple[str, str, str]) -> list[JSON]:
    ts = now_iso()
    return [
        {
            "type": t,
            "status": "True",
            "reason": r,
            "message": m,
            "lastProbeTime": ts,
            "lastTransitionTime": ts,
        }
        for t, r, m in items
    ]


def _failure_policy_action(
    policy: JSON | None, container: str, code: int, *, disrupted: bool = False
) -> tuple[str | None, int]:
    """The first podFailurePolicy rule that matches -> (action, index); (None, -1) if none.

    onPodConditions rules match only DisruptionTarget, on a Pod that `disrupt_next` evicted.
    """
    for index, rule in enumerate((policy or {}).get("rules") or []):
        on_conditions = rule.get("onPodConditions")
        if on_conditions:
            wanted = {(c.get("type"), c.get("status", "True")) for c in on_conditions}
            if disrupted and ("DisruptionTarget", "True") in wanted:
                return rule.get("action"), index
            continue
        on_codes = rule.get("onExitCodes")
        if not on_codes:
            continue
        if on_codes.get("containerName") not in (None, container):
            continue
        values = set(on_codes.get("values") or [])
        hit = code in values if on_codes.get("operator") == "In" else code not in values
        if hit:
            return rule.get("action"), index
    return None, -1


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it after a short grace (the kubelet's grace, shortened)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(1)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
