"""Problems and the BlueprintInvalid error: every finding names the field at fault by its path."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from esper.blueprint.opdef import FieldError

# Union-member tags pydantic adds to error locations; they are not fields and would confuse a reader.
_TYPE_TAGS = {"int", "str", "float", "bool", "list", "dict", "none", "tuple", "literal"}


@dataclass(frozen=True, order=True)
class Problem:
    """One finding: the path of the offending field (e.g. `spec.graph.nodes[2].op`) and why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class BlueprintInvalid(ValueError):
    """Raised with every problem found, so one round trip shows the author all of them."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


def join_path(prefix: str, loc: Sequence[str | int]) -> str:
    """`("nodes", 2, "op")` under `spec.graph` -> `spec.graph.nodes[2].op`."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out


def suggest(name: str, known: Iterable[str]) -> str:
    """A "did you mean" tail for a misspelt name, or ''."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def _clean_loc(loc: Sequence[str | int]) -> list[str | int]:
    return [p for p in loc if not (isinstance(p, str) and ("[" in p or "(" in p or p in _TYPE_TAGS))]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def pydantic_problems(err: ValidationError, prefix: str, known_fields: Iterable[str] = ()) -> list[Problem]:
    """Problems from a pydantic error, with paths under `prefix`; unknown fields get a suggestion."""
    known = sorted(known_fields)
    problems: list[Problem] = []
    for e in err.errors():
        loc = _clean_loc(e["loc"])
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc.append(cause.field)
            message = cause.message
        elif e["type"] == "extra_forbidden":
            name = str(loc[-1]) if loc else "?"
            message = f"unknown field '{name}'" + suggest(name, known)
            if known and not suggest(name, known):
                message += f" (known: {', '.join(known)})"
        elif e["type"] == "missing":
            message = "required"
        else:
            message = str(e["msg"]).removeprefix("Value error, ")
            if e["type"] not in ("model_type", "dict_type") and not isinstance(e.get("input"), dict):
                message += f" (got {_short(e.get('input'))})"
        problems.append(Problem(join_path(prefix, loc), message))
    return problems
