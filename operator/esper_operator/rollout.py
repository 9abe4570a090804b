"""Keep-last-good rollouts of a Blueprint's Kernels (pure: no I/O).

As a Deployment keeps its old ReplicaSet serving until the new one is available, a Blueprint keeps
serving, per target, its last Ready Kernel until the Kernel of its current revision is Ready. Each
change of the Kernels a Blueprint asks for is a new revision; previous revisions that served are kept in
a bounded history (`spec.historyLimit`) with their Kernels, so a rollback is instant: the Kernels are
still there, Ready.

A Blueprint's relation to each Kernel it holds is a role, written on the Kernel as the label
`blueprint.esper.dev/<blueprint>: <role>` and in its `status.requesters`:
`serving` (what the sidecar of a training pod should load), `candidate` (the current revision, not yet
served) and `retained` (history).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SERVING, CANDIDATE, RETAINED = "serving", "candidate", "retained"
CARRIED = ("revision", "serving", "servingSummary", "history")
"""Status fields a rollout owns: kept as they are while the spec is invalid."""


@dataclass(frozen=True)
class Rollout:
    revision: int
    serving: list[dict[str, str]]
    history: list[dict[str, Any]]
    roles: dict[str, str]  # Kernel name -> this Blueprint's role on it

    def status_fields(self, targets: int) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "serving": self.serving,
            "servingSummary": f"{len(self.serving)}/{targets}",
            "history": self.history,
        }


def held(status: Mapping[str, Any]) -> set[str]:
    """Every Kernel a Blueprint's status says it holds: current, serving and history."""
    names = {k["name"] for k in status.get("kernels") or []}
    names |= {k["name"] for k in status.get("serving") or []}
    for entry in status.get("history") or []:
        names |= {k["name"] for k in entry.get("kernels") or []}
    return names


def advance(
    previous: Mapping[str, Any],
    *,
    digest: str,
    current: list[dict[str, str]],
    phases: Mapping[str, str],
    history_limit: int,
) -> Rollout:
    """The next rollout state.

    `current`: the Kernels the spec asks for now (target, name, phase); `phases`: the phase of every
    Kernel the previous status holds (absent: the Kernel is gone).
    """
    revision = int(previous.get("revision") or 0)
    history = [dict(h) for h in previous.get("history") or []]
    before = previous.get("kernels") or []
    names = {k["name"] for k in current}
    if revision == 0 or {k["name"] for k in before} != names:
        if before and any(phases.get(k["name"]) == "Ready" for k in before):
            kept = [{"target": k["target"], "name": k["name"]} for k in before]
            history.insert(0, {"revision": revision, "digest": previous.get("digest", ""), "kernels": kept})
        # Back to a recorded revision (a rollback, or an edit undone): it becomes current again.
        history = [h for h in history if {k["name"] for k in h["kernels"]} != names]
        revision = max([revision, *(h["revision"] for h in history)]) + 1
    history = [h for h in history if any(k["name"] in phases for k in h["kernels"])][:history_limit]

    old_serving = {k["target"]: k for k in previous.get("serving") or []}
    serving = []
    for kernel in current:
        target = kernel["target"]
        if kernel["phase"] == "Ready":
            serving.append({"target": target, "name": kernel["name"], "phase": "Ready"})
        elif (old := old_serving.get(target)) is not None and phases.get(old["name"]) == "Ready":
            serving.append({"target": target, "name": old["name"], "phase": "Ready"})

    roles: dict[str, str] = {}
    for entry in history:
        roles.update({k["name"]: RETAINED for k in entry["kernels"]})
    roles.update({k["name"]: CANDIDATE for k in current})
    roles.update({k["name"]: SERVING for k in serving})
    return Rollout(revision=revision, serving=serving, history=history, roles=roles)
