"""Bodies from the API server, made safe to handle whatever they hold.

A Blueprint's `params` hold any JSON the CRD lets through, so a body can be nested as deep as the API
server's JSON decoder allows: 10,000 levels (Go's encoding/json limit, which every API server
inherits). Python's default recursion limit (1,000) breaks far earlier: kopf's watch decoding
(`json.loads`), its `copy.deepcopy` of bodies and its diff each recurse once or twice per level. So:

- `survive_any_body()` raises the recursion limit (and the worker threads' stack) so that kopf can
  decode, copy and store any body a server can send: a poison Blueprint can neither crash the watch
  for every other Blueprint nor be retried forever.
- `plain()` checks a body with an iterative walk (`check_tree`: depth, number of values, finite
  numbers) before copying it; a refused part raises `BodyRefused`, which the handlers turn into an
  `Invalid` status instead of a traceback.

`metadata.managedFields` mirrors the body's structure (as deep as the spec) and is never needed here,
so it is never copied.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping
from typing import Any

from esper.contracts.manifest import MAX_DEPTH, MAX_VALUES, ManifestError, check_tree

API_SERVER_MAX_DEPTH = 10_000
"""Deepest JSON an API server decodes (Go's encoding/json `maxNestingDepth`)."""
RECURSION_LIMIT = 5 * API_SERVER_MAX_DEPTH + 5_000
"""Frames for the deepest body: up to 2 per level in `copy.deepcopy` and kopf's diff, plus headroom."""
THREAD_STACK_BYTES = 64 * 2**20
"""C stack of worker threads (virtual memory, paid as used): json and repr recurse in C per level."""


class BodyRefused(ValueError):
    """A part of a body is too deep or too large to process; the message names where."""


def survive_any_body() -> None:
    """Let this process decode, copy and diff any body an API server can send (see module doc)."""
    if sys.getrecursionlimit() < RECURSION_LIMIT:
        sys.setrecursionlimit(RECURSION_LIMIT)
    threading.stack_size(THREAD_STACK_BYTES)


def check(part: str, value: Any) -> None:
    """Refuse `value` (found at `part` of a body) if it is deeper or larger than a manifest may be."""
    try:
        check_tree(value, max_depth=MAX_DEPTH, max_values=MAX_VALUES)
    except ManifestError as exc:
        where = part + ("" if not exc.path or exc.path.startswith("[") else ".") + exc.path
        raise BodyRefused(f"{where}: {exc.message}") from None


def plain(body: Mapping[str, Any], *, parts: tuple[str, ...] = ("spec", "status")) -> dict[str, Any]:
    """A plain-dict copy of a (kopf) body; BodyRefused if a checked part is too deep or too large.

    Parts not in `parts` are left out (an empty mapping), so a handler that needs only the metadata
    and status (deletion) works even on a body whose spec is refused.
    """
    meta = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    check("metadata", meta)
    out: dict[str, Any] = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": _copy(meta),
    }
    for part in ("spec", "status"):
        value = body.get(part) or {}
        if part in parts:
            check(part, value)
            out[part] = _copy(value)
        else:
            out[part] = {}
    return out


def _copy(value: Any) -> Any:
    """A deep copy of checked JSON (mappings and lists become dicts and lists)."""
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy(v) for v in value]
    return value
