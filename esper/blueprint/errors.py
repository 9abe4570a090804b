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
_TAG_PREFIXES = ("constrained-", "function-", "lax-or-strict", "json-or-python", "tagged-union")


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
    """`("nodes", 2, "op")` under `spec.graph` -> `spec.graph.nodes[2].op`; long keys are cut."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = cut(str(part))
            out = f"{out}.{text}" if out else text
    return out


def suggest(name: str, known: Iterable[str]) -> str:
    """A "did you mean" tail for a misspelt name, or ''."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def _clean_loc(loc: Sequence[str | int]) -> list[str | int]:
    return [
        p
        for p in loc
        if not (
            isinstance(p, str) and ("[" in p or "(" in p or p in _TYPE_TAGS or p.startswith(_TAG_PREFIXES))
        )
    ]


IDENT_TEXT = "must start with a lowercase letter and hold only a-z, 0-9 and '_' (at most 63 characters)"
PATTERN_TEXT: dict[str, str] = {
    r"^[a-z][a-z0-9_]{0,62}$": IDENT_TEXT,
    r"^[0-9a-f]{64}$": "must be 64 lowercase hex digits (a sha256)",
}
"""Friendly words for the patterns of the models (a regex is no message for an author)."""

_BOOLEAN_HINT = " (YAML reads unquoted yes/no/on/off/y/n/true/false as a boolean: quote it)"


def cut(value: Any, limit: int = 40) -> str:
    """A short printable form of a value, never a full repr: inputs may be megabytes or deeply nested."""
    if isinstance(value, dict):
        return f"a mapping of {len(value)} keys"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} items"
    if isinstance(value, str):
        text = value[: limit + 1].encode("unicode_escape").decode("ascii")
        return text if len(value) <= limit and len(text) <= limit else text[: max(1, limit - 3)] + "..."
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = str(value) if isinstance(value, (int, float)) else "a value"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: Any) -> str:
    """A value as YAML/JSON names it: `the string '512'`, `true (a boolean)`, `null`, `a list of 3 items`."""
    if isinstance(value, str):
        return f"the string '{cut(value)}'"
    if isinstance(value, bool):
        return f"{cut(value)} (a boolean)"
    return cut(value)


def _expectation(e: Any) -> str | None:
    """What a failed check wanted, as a phrase for "must be ..."; None if it is no type/value check."""
    ctx = e.get("ctx") or {}
    kind = e["type"]
    phrases = {
        "int_type": "an integer",
        "int_from_float": "an integer",
        "int_parsing": "an integer",
        "float_type": "a number",
        "float_parsing": "a number",
        "string_type": "a string",
        "bool_type": "true or false",
        "list_type": "a list",
        "dict_type": "a mapping",
        "model_type": "a mapping",
        "model_attributes_type": "a mapping",
        "finite_number": "a finite number",
    }
    if kind in phrases:
        return phrases[kind]
    if kind == "literal_error":
        return f"one of {ctx.get('expected')}" if " or " in str(ctx.get("expected")) else str(ctx["expected"])
    bounds = {
        "greater_than_equal": ("at least", "ge"),
        "greater_than": ("greater than", "gt"),
        "less_than_equal": ("at most", "le"),
        "less_than": ("less than", "lt"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"{words} {ctx.get(key)}"
    return None


def _message(e: Any, patterns: dict[str, str]) -> str:
    ctx = e.get("ctx") or {}
    kind = e["type"]
    value = e.get("input")
    if kind == "missing":
        return "required"
    if kind == "string_pattern_mismatch":
        text = patterns.get(str(ctx.get("pattern")))
        return f"'{cut(value)}' " + (text or "has the wrong form")
    if kind == "string_too_long":
        got = f"{len(value):,}" if isinstance(value, str) else "more"
        return f"at most {ctx.get('max_length')} characters, got {got}"
    if kind == "string_too_short":
        n = ctx.get("min_length")
        return "must not be empty" if n == 1 else f"at least {n} characters"
    if kind == "too_long":
        length = ctx.get("actual_length")
        return f"at most {ctx.get('max_length')} items" + (
            f", got {length:,}" if isinstance(length, int) else ""
        )
    if kind == "too_short":
        n = ctx.get("min_length")
        return f"at least {n} item{'s' if n != 1 else ''}, got {ctx.get('actual_length')}"
    wanted = _expectation(e)
    if wanted is not None:
        hint = _BOOLEAN_HINT if kind == "string_type" and isinstance(value, bool) else ""
        return f"must be {wanted}, got {describe(value)}{hint}"
    return str(e.get("msg", "invalid")).removeprefix("Value error, ")


def pydantic_problems(
    err: ValidationError,
    prefix: str,
    known_fields: Iterable[str] = (),
    patterns: dict[str, str] | None = None,
) -> list[Problem]:
    """Problems from a pydantic error, with paths under `prefix`, in the project's words (no regexes, no
    Python type names, inputs cut short); the members of a failed union become one line."""
    known = sorted(known_fields)
    words = {**PATTERN_TEXT, **(patterns or {})}
    problems: list[Problem] = []
    unions: dict[str, tuple[int, list[str], Any]] = {}
    for e in err.errors(include_url=False):
        raw_loc = list(e["loc"])
        loc = _clean_loc(raw_loc)
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc.extend(cause.field if isinstance(cause.field, tuple) else (cause.field,))
            message = cause.message
        elif e["type"] == "extra_forbidden":
            name = cut(loc[-1]) if loc else "?"
            message = f"unknown field '{name}'" + suggest(name, known)
            if known and not suggest(name, known) and len(known) <= 12:
                message += f" (known: {', '.join(known)})"
        else:
            message = _message(e, words)
            wanted = _expectation(e)
            if wanted is not None and e["type"].startswith(("greater", "less")):
                wanted = f"an integer {wanted}" if isinstance(e.get("input"), int) else f"a number {wanted}"
            if len(raw_loc) != len(loc) and wanted is not None:  # a member of a union
                path = join_path(prefix, loc)
                if path in unions:
                    unions[path][1].append(wanted)
                    continue
                unions[path] = (len(problems), [wanted], e.get("input"))
        problems.append(Problem(join_path(prefix, loc), message))
    for path, (index, members, value) in unions.items():
        if len(members) > 1:
            problems[index] = Problem(path, f"must be {' or '.join(members)}, got {describe(value)}")
    return problems
