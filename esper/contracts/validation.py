"""Whole-spec validation of a Blueprint: the graph (deep) and the rest (targets, compile options).

Shared by the operator (sets the Invalid condition), the compiler (exit 65) and `esper validate`, so a
user sees the same `path: message` lines wherever a Blueprint is checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from esper.blueprint import BlueprintInvalid, Graph, Problem, digest, validate_source
from esper.contracts.blueprint import BlueprintSpec
from esper.targets import Target

SOURCE_FIELDS = ("template", "graph")


@dataclass(frozen=True)
class ValidatedSpec:
    spec: BlueprintSpec
    graph: Graph
    digest: str


def _path(prefix: str, loc: tuple[Any, ...]) -> str:
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def validate_blueprint_spec(raw: Any, *, path_prefix: str = "spec") -> ValidatedSpec:
    """Check a Blueprint spec; raise BlueprintInvalid listing every problem found."""
    if not isinstance(raw, dict):
        raise BlueprintInvalid([Problem(path_prefix, f"must be an object, not {type(raw).__name__}")])
    problems: list[Problem] = []
    graph: Graph | None = None
    source = {key: raw[key] for key in SOURCE_FIELDS if raw.get(key) is not None}
    try:
        graph = validate_source(source, path_prefix=path_prefix)
    except BlueprintInvalid as exc:
        problems.extend(exc.problems)
    spec: BlueprintSpec | None = None
    try:
        spec = BlueprintSpec.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            if loc and loc[0] in SOURCE_FIELDS:
                continue  # reported above, with deeper checks
            message = err["msg"].removeprefix("Value error, ")
            if not loc and "exactly one of" in message:
                continue  # validate_source said it
            problems.append(Problem(_path(path_prefix, loc), message))
    for index, target in enumerate(spec.targets if spec else []):
        try:
            Target.parse(target)
        except ValueError as exc:
            problems.append(Problem(f"{path_prefix}.targets[{index}]", str(exc)))
    if problems or spec is None or graph is None:
        raise BlueprintInvalid(problems or [Problem(path_prefix, "invalid")])
    return ValidatedSpec(spec=spec, graph=graph, digest=digest(graph))
