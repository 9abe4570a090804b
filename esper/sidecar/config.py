"""The Kasmina sync sidecar's configuration (from the pod's environment) and label selectors."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from esper.envconfig import read_env
from esper.sidecar.index import NAME_RE
from esper.storage import parse_s3_uri
from esper.targets import parse_targets

if TYPE_CHECKING:
    from esper.signing import TrustedKeys

SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


# ---- configuration -------------------------------------------------------------------------------

_ENV = {  # field -> environment variable
    "kernel_dir": "ESPER_KERNEL_DIR", "kernels": "ESPER_KERNELS", "selector": "ESPER_KERNEL_SELECTOR",
    "namespace": "ESPER_NAMESPACE", "store_uri": "ESPER_STORE_URI", "targets": "ESPER_TARGET",
    "port": "ESPER_SYNC_PORT", "host": "ESPER_SYNC_HOST", "watch_timeout": "ESPER_SYNC_WATCH_TIMEOUT",
    "retry_base": "ESPER_SYNC_RETRY_BASE", "retry_max": "ESPER_SYNC_RETRY_MAX",
    "workers": "ESPER_SYNC_WORKERS", "trusted_keys": "ESPER_TRUSTED_KEYS",
    "max_bundle_bytes": "ESPER_MAX_BUNDLE_BYTES",
}  # fmt: skip
DEFAULT_MAX_BUNDLE_BYTES = 4 * 1024**3


class SyncConfig(BaseModel):
    """What to sync, where to, and how; `from_env()` reads it from the pod's environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kernel_dir: Path = Field(description="the shared kernel volume's mount path")
    kernels: tuple[str, ...] = ()
    selector: str | None = None
    namespace: str = "default"
    store_uri: str | None = None
    targets: tuple[str, ...] = Field(default=(), description="sync only these targets' Kernels; empty: all")
    port: int = Field(default=9090, ge=0, le=65535)
    host: str = "0.0.0.0"
    watch_timeout: int = Field(default=300, ge=1, le=3600)
    retry_base: float = Field(default=1.0, gt=0)
    retry_max: float = Field(default=60.0, gt=0)
    workers: int = Field(default=4, ge=1, le=32)
    trusted_keys: str = Field(
        default="",
        description="public keys (files or directories of *.pub; ':'-separated or a JSON list) whose "
        "signatures are accepted; empty: the local key pair's (esper.signing)",
    )
    max_bundle_bytes: int = Field(
        default=DEFAULT_MAX_BUNDLE_BYTES, ge=1, description="larger bundles are refused"
    )

    @field_validator("kernels", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return tuple(n.strip() for n in v.split(",") if n.strip()) if isinstance(v, str) else v

    @field_validator("kernels")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [n for n in v if not NAME_RE.fullmatch(n)]
        if bad:
            raise ValueError(f"not Kubernetes object names: {', '.join(map(repr, bad))}")
        return v

    @field_validator("selector", "store_uri", mode="before")
    @classmethod
    def _blank(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: str | None) -> str | None:
        if v is not None:
            parse_selector(v)
        return v

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        return parse_targets(v) if isinstance(v, str | list | tuple) else v  # ValueError: what is accepted

    @field_validator("store_uri")
    @classmethod
    def _store(cls, v: str | None) -> str | None:
        if v is not None and v.startswith("s3://"):
            parse_s3_uri(v)
        elif v is not None and "://" in v and not v.startswith("file://"):
            raise ValueError(f"unsupported store URI {v!r} (use s3://bucket/prefix, file:///path or a path)")
        return v

    @field_validator("trusted_keys")
    @classmethod
    def _keys(cls, v: str) -> str:
        from esper.signing import KeyFileError, TrustedKeys, parse_key_paths

        try:
            paths = parse_key_paths(v)
            if paths and not len(TrustedKeys.from_paths(paths)):
                raise ValueError(f"no public keys (*.pub) found in {v!r}")
        except (KeyFileError, ValueError) as e:
            raise ValueError(str(e)) from None
        return v

    def trusted(self) -> TrustedKeys:
        """The keys bundle signatures must verify with (re-read when a key file changes)."""
        from esper.signing import TRUSTED_KEYS_ENV, TrustedKeys

        return TrustedKeys.from_env({**os.environ, TRUSTED_KEYS_ENV: self.trusted_keys})

    @model_validator(mode="after")
    def _something(self) -> SyncConfig:
        if not self.kernels and self.selector is None:
            raise ValueError("set ESPER_KERNELS (comma-separated Kernel names) and/or ESPER_KERNEL_SELECTOR")
        if self.retry_max < self.retry_base:
            raise ValueError("ESPER_SYNC_RETRY_MAX must be at least ESPER_SYNC_RETRY_BASE")
        return self

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> SyncConfig:
        """Read the ESPER_* variables (see `_ENV`); ConfigError listing every problem."""
        env = os.environ if env is None else env
        defaults = {} if env.get(_ENV["namespace"], "").strip() else {"namespace": default_namespace(env)}
        return read_env(cls, _ENV, what="sidecar", env=env, extra={**defaults, **overrides})


def default_namespace(env: Mapping[str, str] | None = None) -> str:
    """The pod's namespace: POD_NAMESPACE (downward API), the serviceaccount file, else "default"."""
    env = os.environ if env is None else env
    if env.get("POD_NAMESPACE", "").strip():
        return env["POD_NAMESPACE"].strip()
    try:
        return Path(SA_NAMESPACE_FILE).read_text().strip() or "default"
    except OSError:
        return "default"


# ---- label selectors ------------------------------------------------------------------------------
# Matched client-side over an unfiltered watch of the namespace's Kernels: names and a selector combine
# as a union, and a Kernel whose labels stop matching is seen leaving (a selector-filtered watch would
# depend on the server turning that into DELETED). Kernels per namespace are few; the cost is small.

_REQ = re.compile(
    r"\s*(?:!\s*(?P<nkey>[\w./-]+)|(?P<key>[\w./-]+)\s*(?:(?P<op>==|=|!=)\s*(?P<val>[\w.-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<set>[^)]*)\))?)\s*(?:,|$)"
)


def parse_selector(text: str) -> list[tuple[str, str, frozenset[str]]]:
    """`a=b,c!=d,e in (x,y),f notin (z),g,!h` -> [(key, op, values)]; ValueError on garbage."""
    reqs: list[tuple[str, str, frozenset[str]]] = []
    pos, text = 0, text.strip()
    while pos < len(text):
        m = _REQ.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"invalid label selector {text!r} at {text[pos:]!r}")
        if m["nkey"]:
            reqs.append((m["nkey"], "!", frozenset()))
        elif m["op"]:
            reqs.append((m["key"], "!=" if m["op"] == "!=" else "=", frozenset([m["val"]])))
        elif m["setop"]:
            values = frozenset(v.strip() for v in m["set"].split(",") if v.strip())
            reqs.append((m["key"], m["setop"], values))
        else:
            reqs.append((m["key"], "exists", frozenset()))
        pos = m.end()
    return reqs


def selector_matches(reqs: list[tuple[str, str, frozenset[str]]], labels: Mapping[str, str]) -> bool:
    for key, op, values in reqs:
        present, value = key in labels, labels.get(key)
        ok = {"=": present and value in values, "in": present and value in values,
              "!=": not present or value not in values, "notin": not present or value not in values,
              "exists": present, "!": not present}[op]  # fmt: skip
        if not ok:
            return False
    return True
