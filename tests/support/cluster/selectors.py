"""Label and field selectors, JSONPath for printer columns, and server-side tables (`kubectl get`)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kmock
from kmock._internal import rendering

from .base import JSON, bad_request, human_age

# --------------------------------------------------------------------------------------------
# Selectors


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "=":
            return present and value in self.values
        if self.op == "in":
            return present and value in self.values
        if self.op in ("!=", "notin"):  # absent keys satisfy inequality, as in Kubernetes
            return not present or value not in self.values
        if self.op == "exists":
            return present
        return not present  # "!key"


_LABEL_REQ = re.compile(
    r"\s*(?:(?P<neg>!)\s*(?P<nkey>[\w./-]+)"
    r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|=|!=)\s*(?P<val>[\w.-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<set>[^)]*)\))?)\s*(?:,|$)"
)


def parse_label_selector(text: str | None) -> list[Requirement]:
    """Parse `a=b,c!=d,e in (x,y),f notin (z),g,!h` as the API server does; 400 on garbage."""
    reqs: list[Requirement] = []
    text = (text or "").strip()
    pos = 0
    while pos < len(text):
        m = _LABEL_REQ.match(text, pos)
        if not m or m.end() == pos:
            raise bad_request(f"unable to parse requirement: {text[pos:]!r} in labelSelector {text!r}")
        if m["nkey"]:
            reqs.append(Requirement(m["nkey"], "!"))
        elif m["op"]:
            reqs.append(Requirement(m["key"], "=" if m["op"] in ("=", "==") else "!=", frozenset([m["val"]])))
        elif m["setop"]:
            values = frozenset(v.strip() for v in m["set"].split(",") if v.strip())
            reqs.append(Requirement(m["key"], m["setop"], values))
        else:
            reqs.append(Requirement(m["key"], "exists"))
        pos = m.end()
    return reqs


def parse_field_selector(text: str | None, allowed: set[str]) -> list[tuple[str, bool, str]]:
    """`path=value,path!=value` -> [(path, equal, value)]; unknown paths are a 400 as in Kubernetes."""
    out = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        m = re.fullmatch(r"\s*([\w.\[\]'-]+)\s*(==|=|!=)\s*(.*?)\s*", part)
        if not m:
            raise bad_request(f"invalid selector: {part!r}")
        path, op, value = m.groups()
        if path not in allowed:
            raise bad_request(f"field label not supported: {path}")
        out.append((path, op != "!=", value))
    return out


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """A selectable field's value as a string; absent fields read as "" (as the API server does)."""
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, Mapping) else None
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def jsonpath_values(obj: Any, path: str) -> list[Any]:
    """A tiny JSONPath for printer columns: `.a.b`, `.a[0]`, `.a[*].b`, `.a[?(@.type=="Ready")].status`."""
    tokens = re.findall(
        r"\.([\w-]+)|\[(\d+|\*)\]|\[\?\(@\.([\w-]+)\s*==\s*[\"']([^\"']*)[\"']\)\]",
        path.strip().lstrip("{").rstrip("}"),
    )
    current = [obj]
    for name, index, fkey, fval in tokens:
        nxt: list[Any] = []
        for item in current:
            if name and isinstance(item, Mapping) and name in item:
                nxt.append(item[name])
            elif index == "*" and isinstance(item, list):
                nxt.extend(item)
            elif index and isinstance(item, list) and int(index) < len(item):
                nxt.append(item[int(index)])
            elif fkey and isinstance(item, list):
                nxt.extend(x for x in item if isinstance(x, Mapping) and str(x.get(fkey)) == fval)
        current = nxt
    return current


@dataclass
class _Extras:
    """Per-resource facts a CRD declares that kmock's ResourceInfo has no place for."""

    printer_columns: list[JSON] = field(default_factory=list)
    selectable: set[str] = field(default_factory=set)
    custom: bool = False


class TablesMixin:
    """Server-side Table rendering from a CRD's additionalPrinterColumns (part of EsperEmulator)."""

    @staticmethod
    def _wants_table(request: rendering.Request) -> bool:
        accept = next((v for k, v in request.headers.items() if k.lower() == "accept"), "")
        return "as=Table" in accept

    # ---- tables (kubectl get) ----------------------------------------------------------------

    def _table(self, request: rendering.Request, res: kmock.resource, objs: list[JSON]) -> JSON:
        # `Accept: application/json;as=Table;g=meta.k8s.io;v=v1`: the server renders the columns,
        # from a CRD's additionalPrinterColumns (Name + Age when it declares none).
        extras = self._extras.get(res, _Extras())
        columns = extras.printer_columns or [
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
        ]
        defs = [
            {
                "name": "Name",
                "type": "string",
                "format": "name",
                "priority": 0,
                "description": "Name must be unique within a namespace.",
            }
        ]
        defs += [
            {
                "name": c["name"],
                "type": c.get("type", "string"),
                "format": c.get("format", ""),
                "priority": c.get("priority", 0),
                "description": c.get("description", ""),
            }
            for c in columns
        ]
        include = request.params.get("includeObject", "Metadata")
        rows = []
        for obj in objs:
            cells: list[Any] = [obj["metadata"]["name"]]
            for col in columns:
                values = jsonpath_values(obj, col["jsonPath"])
                value = values[0] if values else None
                if value is not None and col.get("type") == "date":
                    value = human_age(value)
                elif isinstance(value, dict | list):
                    value = json.dumps(value)
                cells.append(value)
            row: JSON = {"cells": cells}
            if include == "Object":
                row["object"] = obj
            elif include != "None":
                row["object"] = {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                }
            rows.append(row)
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": str(self._rv)},
            "columnDefinitions": defs,
            "rows": rows,
        }
