"""Graph walking shared by validation, canonical form and the builder."""

from __future__ import annotations

import heapq

from esper.blueprint.ir import Node


def topo_order(nodes: list[Node]) -> tuple[list[Node], list[Node]]:
    """Nodes in dependency order, ties broken by id (so the order is canonical); plus those on cycles.

    Refs to graph inputs or unknown ids are not dependencies; validation reports the unknown ones.
    """
    by_id = {n.id: n for n in nodes}
    deps = {n.id: {i for i in n.inputs if i in by_id} for n in by_id.values()}
    users: dict[str, list[str]] = {i: [] for i in by_id}
    for nid, ds in deps.items():
        for d in ds:
            users[d].append(nid)
    waiting = {nid: len(ds) for nid, ds in deps.items()}
    ready = [nid for nid, k in waiting.items() if k == 0]
    heapq.heapify(ready)
    order: list[Node] = []
    while ready:
        nid = heapq.heappop(ready)
        order.append(by_id[nid])
        for u in users[nid]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    done = {n.id for n in order}
    return order, [n for n in by_id.values() if n.id not in done]


def find_cycle(stuck: list[Node]) -> list[str]:
    """One cycle among nodes Kahn could not order, as ids [a, b, ..., a]."""
    by_id = {n.id: n for n in stuck}
    start = min(by_id)
    path: list[str] = []
    seen: dict[str, int] = {}
    nid = start
    # Every stuck node waits on another stuck node, so following inputs must loop.
    while nid not in seen:
        seen[nid] = len(path)
        path.append(nid)
        nid = min(i for i in by_id[nid].inputs if i in by_id)
    cycle = path[seen[nid] :]
    return [*cycle, cycle[0]]
