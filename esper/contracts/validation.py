"""The one Blueprint validator: a manifest (`validate_blueprint`) or its spec (`validate_blueprint_spec`).

Used by the operator (sets the Invalid condition), the compile Job (exit 65), `esper validate`, `esper
compile` and the demo, so a user sees the same `path: message` lines wherever a Blueprint is checked. The
dependency runs one way: this module calls the IR's graph checks (`esper.blueprint.validate_source`) and
adds what only the resource knows (apiVersion, kind, metadata, targets, compile options, maxBatch).

Limits come first: a body too deep or too large is refused before any recursive walk (pydantic's
included), so no input can raise RecursionError or take seconds.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from esper.blueprint import BlueprintInvalid, Graph, Problem, digest, validate_source
from esper.blueprint.errors import cut, describe, join_path, pydantic_problems, suggest
from esper.blueprint.validate import DEFAULT_MAX_BATCH
from esper.contracts.blueprint import TARGET_PATTERN, TARGET_TEXT, BlueprintSpec
from esper.contracts.common import GROUP_VERSION, MAX_BATCH
from esper.contracts.manifest import ManifestError, check_tree
from esper.contracts.naming import label_key_problem, label_value_problem, name_problem
from esper.targets import Target

KIND = "Blueprint"
SOURCE_FIELDS = ("template", "graph")
TOP_LEVEL_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")
MAX_PROBLEMS = 50
"""Most problems reported for one Blueprint: the first ones are the causes, the rest mostly echoes."""


@dataclass(frozen=True)
class ValidatedSpec:
    spec: BlueprintSpec
    graph: Graph
    digest: str


@dataclass(frozen=True)
class ValidatedBlueprint:
    name: str
    checked: ValidatedSpec


def _capped(problems: list[Problem], prefix: str) -> list[Problem]:
    if len(problems) <= MAX_PROBLEMS:
        return problems
    more = len(problems) - MAX_PROBLEMS
    return [*problems[:MAX_PROBLEMS], Problem(prefix or "(document)", f"... and {more:,} more problems")]


def _limits(raw: Any, prefix: str) -> None:
    try:
        check_tree(raw)
    except ManifestError as exc:
        path = f"{prefix}.{exc.path}" if prefix and exc.path else prefix or exc.path
        raise BlueprintInvalid([Problem(path or "(document)", exc.message)]) from None


def _max_batch(raw: Mapping[str, Any], spec: BlueprintSpec | None) -> int:
    """maxBatch for the activation bound; the largest allowed when the spec's own value is invalid, so an
    activation that could never fit is still reported."""
    if spec is not None:
        return spec.compile.maxBatch
    options = raw.get("compile")
    value = options.get("maxBatch") if isinstance(options, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_BATCH:
        return value
    return DEFAULT_MAX_BATCH


def validate_blueprint_spec(raw: Any, *, path_prefix: str = "spec") -> ValidatedSpec:
    """Check a Blueprint spec; raise BlueprintInvalid listing every problem found."""
    _limits(raw, path_prefix)
    if not isinstance(raw, dict):
        raise BlueprintInvalid([Problem(path_prefix, f"must be a mapping, got {describe(raw)}")])
    problems: list[Problem] = []
    spec: BlueprintSpec | None = None
    try:
        spec = BlueprintSpec.model_validate(raw)
    except ValidationError as exc:
        words = {TARGET_PATTERN: TARGET_TEXT}
        for p in pydantic_problems(exc, path_prefix, BlueprintSpec.model_fields, words):
            rest = p.path.removeprefix(path_prefix).lstrip(".")
            if rest.split(".", 1)[0].split("[", 1)[0] in SOURCE_FIELDS:
                continue  # reported below, with deeper checks
            if not rest and "exactly one of" in p.message:
                continue  # validate_source says it
            problems.append(p)
    graph: Graph | None = None
    try:
        source = {key: raw[key] for key in SOURCE_FIELDS if raw.get(key) is not None}
        graph = validate_source(source, path_prefix=path_prefix, max_batch=_max_batch(raw, spec))
    except BlueprintInvalid as exc:
        problems[:0] = exc.problems  # the architecture first: it is what the author is writing
    for index, target in enumerate(spec.targets if spec else []):
        try:
            Target.parse(target)
        except ValueError as exc:
            problems.append(Problem(f"{path_prefix}.targets[{index}]", str(exc)))
    if problems or spec is None or graph is None:
        raise BlueprintInvalid(_capped(problems or [Problem(path_prefix, "invalid")], path_prefix))
    return ValidatedSpec(spec=spec, graph=graph, digest=digest(graph))


def document_kind(doc: Any) -> Literal["blueprint", "spec", "other"]:
    """What a manifest document is to a Blueprint reader.

    "other": a resource that is clearly not a Blueprint (a Pod, RBAC): skipped with a note. "spec": a bare
    spec (no apiVersion/kind/metadata). "blueprint": everything else, near misses included: a `kind:
    blueprint` or an `esper.dev` object with a kind like it is a Blueprint with a mistake, not another kind.
    """
    if not isinstance(doc, dict):
        return "blueprint"
    kind = doc.get("kind")
    if kind is None:
        return "blueprint" if any(k in doc for k in ("apiVersion", "metadata", "spec")) else "spec"
    if not isinstance(kind, str) or kind == KIND:
        return "blueprint"
    near = kind.strip().lower() == KIND.lower() or bool(
        difflib.get_close_matches(kind[:64], [KIND], cutoff=0.75)
    )
    api = doc.get("apiVersion")
    ours = isinstance(api, str) and api.split("/", 1)[0] == GROUP_VERSION.split("/", 1)[0]
    return "blueprint" if near or (ours and kind[:64].lower() not in ("kernel",)) else "other"


def _metadata_problems(meta: Any) -> tuple[str, list[Problem]]:
    """The name, and what is wrong with metadata, as the API server would check it."""
    if meta is None:
        return "", [Problem("metadata", "required (a mapping with a name)")]
    if not isinstance(meta, dict):
        return "", [Problem("metadata", f"must be a mapping, got {describe(meta)}")]
    problems: list[Problem] = []
    name = meta.get("name")
    if name is None and meta.get("generateName") is None:
        problems.append(Problem("metadata.name", "required"))
    elif name is not None:
        if not isinstance(name, str):
            problems.append(Problem("metadata.name", f"must be a string, got {describe(name)}"))
        elif (why := name_problem(name)) is not None:
            problems.append(Problem("metadata.name", f"'{cut(name)}' is not a valid name: {why}"))
    namespace = meta.get("namespace")
    if namespace is not None:
        if not isinstance(namespace, str):
            problems.append(Problem("metadata.namespace", f"must be a string, got {describe(namespace)}"))
        elif (why := name_problem(namespace)) is not None or len(namespace) > 63 or "." in namespace:
            why = why or "at most 63 characters, no '.'"
            problems.append(
                Problem("metadata.namespace", f"'{cut(namespace)}' is not a valid namespace: {why}")
            )
    for field in ("labels", "annotations"):
        values = meta.get(field)
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append(Problem(f"metadata.{field}", f"must be a mapping, got {describe(values)}"))
            continue
        for key, value in values.items():
            path = join_path(f"metadata.{field}", [key])
            if (why := label_key_problem(key)) is not None:
                problems.append(Problem(path, f"invalid key: {why}"))
            if not isinstance(value, str):
                hint = " (quote it)" if isinstance(value, (bool, int, float)) else ""
                problems.append(Problem(path, f"must be a string, got {describe(value)}{hint}"))
            elif field == "labels" and (why := label_value_problem(value)) is not None:
                problems.append(Problem(path, f"'{cut(value)}' is not a valid label value: {why}"))
    return (name if isinstance(name, str) else ""), problems


def envelope_problems(doc: Any) -> list[Problem]:
    """What is wrong with a manifest outside its spec: apiVersion, kind, top-level fields, metadata, a spec
    at all. Limits are checked first, so any parsed document is safe to pass."""
    try:
        _limits(doc, "")
    except BlueprintInvalid as exc:
        return exc.problems
    if not isinstance(doc, dict):
        return [Problem("(document)", f"must be a mapping (a Blueprint), got {describe(doc)}")]
    problems: list[Problem] = []
    api = doc.get("apiVersion")
    if api is None:
        problems.append(Problem("apiVersion", f"required: {GROUP_VERSION}"))
    elif api != GROUP_VERSION:
        problems.append(Problem("apiVersion", f"must be {GROUP_VERSION}, got {describe(api)}"))
    kind = doc.get("kind")
    if kind is None:
        problems.append(Problem("kind", f"required: {KIND}"))
    elif kind != KIND:
        hint = " (kinds are case-sensitive)" if isinstance(kind, str) and kind.lower() == KIND.lower() else ""
        problems.append(Problem("kind", f"must be {KIND}, got {describe(kind)}{hint}"))
    for key in doc:
        if key not in TOP_LEVEL_FIELDS:
            text = cut(key)
            tail = suggest(text, TOP_LEVEL_FIELDS) or f" (a Blueprint has {', '.join(TOP_LEVEL_FIELDS)})"
            problems.append(Problem(join_path("", [key]), f"unknown field '{text}'" + tail))
    problems += _metadata_problems(doc.get("metadata"))[1]
    if doc.get("spec") is None:
        problems.append(Problem("spec", "required"))
    return problems


def validate_blueprint(doc: Any) -> ValidatedBlueprint:
    """Check a whole Blueprint manifest (apiVersion, kind, metadata, spec); BlueprintInvalid with every
    problem, the envelope's first (a wrong kind explains everything after it)."""
    problems = envelope_problems(doc)
    checked: ValidatedSpec | None = None
    if (
        isinstance(doc, dict)
        and doc.get("spec") is not None
        and not any(p.path == "(document)" for p in problems)
    ):
        try:
            checked = validate_blueprint_spec(doc["spec"], path_prefix="spec")
        except BlueprintInvalid as exc:
            problems += exc.problems
    if problems or checked is None:
        raise BlueprintInvalid(_capped(problems, ""))
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return ValidatedBlueprint(name=name if isinstance(name, str) else "", checked=checked)
