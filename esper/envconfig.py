"""Settings from environment variables, read one way by every Esper process (the operator, the sync
sidecar): a pydantic model, a field -> variable map, and one error listing every variable at fault.

A blank variable counts as unset (Helm renders absent values as ""); list and dict fields are JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A process's environment is invalid; the message names each variable at fault."""


def env_names(model: type[BaseModel], prefix: str) -> dict[str, str]:
    """field -> PREFIX + FIELD (store_uri -> ESPER_STORE_URI)."""
    return {name: prefix + name.upper() for name in model.model_fields}


def read_env(
    model: type[M],
    names: Mapping[str, str],
    *,
    what: str,
    env: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> M:
    """`model` from the variables in `names` (field -> variable), then `extra` on top; ConfigError
    ("invalid <what> configuration:" and one `VARIABLE: problem` line each) if anything is wrong."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    problems: list[str] = []
    for field, var in names.items():
        raw = env.get(var, "")
        if not raw.strip():
            continue
        try:
            values[field] = _decode(model, field, raw)
        except json.JSONDecodeError as exc:
            problems.append(f"{var}: not valid JSON ({exc.msg})")
    values.update(extra or {})
    try:
        config = model.model_validate(values)
    except ValidationError as exc:
        problems += [_line(model, names, err) for err in exc.errors()]
    if problems:
        raise ConfigError(f"invalid {what} configuration:\n  " + "\n  ".join(problems))
    return config


def read_setting(
    model: type[BaseModel],
    field: str,
    names: Mapping[str, str],
    *,
    what: str,
    env: Mapping[str, str] | None = None,
) -> Any:
    """One field of `model`, with its constraints, for a value needed before the whole config can be
    read (a handler's interval fixed at import); its default when unset."""
    env = os.environ if env is None else env
    info, var = model.model_fields[field], names[field]
    raw = env.get(var, "")
    if not raw.strip():
        return info.get_default(call_default_factory=True)
    try:
        annotation: Any = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        return TypeAdapter(annotation).validate_python(_decode(model, field, raw))
    except (ValidationError, json.JSONDecodeError) as exc:
        message = (
            exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else f"not valid JSON ({exc.msg})"
        )
        raise ConfigError(f"invalid {what} configuration:\n  {var}: {message}") from None


def _decode(model: type[BaseModel], field: str, raw: str) -> Any:
    annotation = str(model.model_fields[field].annotation)
    return json.loads(raw) if "dict" in annotation or "list" in annotation else raw


def _line(model: type[BaseModel], names: Mapping[str, str], err: Any) -> str:
    field = str(err["loc"][0]) if err["loc"] else ""
    var = names.get(field, "config")
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "missing":
        description = model.model_fields[field].description if field in model.model_fields else None
        message = f"required ({description})" if description else "required"
    return f"{var}: {message}"
