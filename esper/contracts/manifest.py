"""The one reader of YAML/JSON manifests: bounded, strict, and safe to point at hostile bytes.

Every process that reads a manifest (the CLI, the compile Job, the demo) goes through `load_documents`;
the operator, which receives bodies the API server already parsed, runs `check_tree` on them. Both refuse,
before any recursive walk or expansion, what could exhaust memory or the stack:

- bytes that are not UTF-8 (the message names the byte offset);
- more than `MAX_BYTES`, nesting deeper than `MAX_DEPTH`, more than `MAX_VALUES` values in a document
  (aliases count as the values they stand for, so a "billion laughs" alias bomb fails after a few
  thousand events, with no expansion at all);
- duplicate keys (a YAML parser would silently keep the last), keys that are not strings;
- tags beyond the JSON types (`!!python/...`, `!!set`, `!!binary`), `.nan` and `.inf` (JSON has none).

The document is built from libyaml's event stream (the C parser when installed) in one iterative pass,
so depth never reaches Python's recursion limit. Plain `y`/`n` are read as booleans, as kubectl's YAML 1.1
does, so that a manifest means here what it means to the API server. Messages never echo more than a short
prefix of any value or key.
"""

from __future__ import annotations

import codecs
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from esper.blueprint.errors import cut

MAX_BYTES = 8 * 2**20
"""Largest manifest read (the API server's own request limit is 3 MiB)."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and lists; a Blueprint needs fewer than 10 levels."""
MAX_VALUES = 100_000
"""Most values (scalars, mappings, lists; aliases counted expanded) in one document."""
MAX_DOCUMENTS = 256
"""Most documents in one file."""
MAX_SCALAR_CHARS = 4 * 2**20
"""Longest scalar: well under MAX_BYTES, so one key or value cannot dominate memory."""
_MAX_NUMBER_CHARS = 64

_LOADER: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR = "tag:yaml.org,2002:str"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"
_SCALAR_TAGS = {
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:timestamp",
    _STR,
}
_JSON_NUMBER = re.compile(r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?$")
"""JSON's numbers: YAML 1.1 reads `1e-05` or `1.5e3` as strings; JSON, YAML 1.2 and kubectl as floats."""
_YAML11_BOOLS = {"y": True, "Y": True, "n": False, "N": False}
"""Plain scalars kubectl's YAML 1.1 reads as booleans and PyYAML reads as strings."""


def _key_text(key: Any) -> str:
    return cut(key, 40)


def _deep_path(path: list[str | int]) -> str:
    return format_path(path[:8]) + (f"... ({len(path)} levels)" if len(path) > 8 else "")


def format_path(parts: list[str | int] | tuple[str | int, ...]) -> str:
    """`["spec", "targets", 2]` -> `spec.targets[2]`; long keys are cut."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = _key_text(part)
            out = f"{out}.{text}" if out else text
    return out


class ManifestError(ValueError):
    """A manifest that cannot be read: where (path and/or line) and why, in one short line."""

    def __init__(self, message: str, *, path: str = "", line: int | None = None, document: int | None = None):
        self.message = message
        self.path = path
        self.line = line
        self.document = document
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.path:
            where.append(self.path)
        return (": ".join(where) + ": " if where else "") + self.message


def decode(data: bytes) -> str:
    """UTF-8 text (a BOM is dropped); else ManifestError naming the first bad byte and its offset."""
    if len(data) > MAX_BYTES:
        raise ManifestError(f"{_size(len(data))}; at most {_size(MAX_BYTES)}")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} ({exc.reason})"
        ) from None


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


@dataclass
class _Frame:
    """An open mapping or list while its events arrive."""

    value: dict[str, Any] | list[Any]
    path: list[str | int]
    start_count: int
    anchor: str | None
    key: Any = None
    has_key: bool = False
    key_line: int = 0
    merge_next: bool = False
    merges: list[dict[str, Any]] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)


class _Builder:
    """Python values from libyaml events, one document at a time, with every limit checked per event."""

    def __init__(self, text: str) -> None:
        self.loader = _LOADER(text)
        self.document = 0
        self.anchors: dict[str, tuple[Any, int]] = {}
        self.count = 0

    def documents(self) -> Iterator[Any]:
        try:
            while True:
                event = self.loader.get_event()
                if isinstance(event, yaml.StreamEndEvent):
                    return
                if isinstance(event, yaml.DocumentStartEvent):
                    self.document += 1
                    if self.document > MAX_DOCUMENTS:
                        raise ManifestError(f"more than {MAX_DOCUMENTS} documents")
                    yield self._document()
        finally:
            self.loader.dispose()

    def _error(self, message: str, event: Any, path: list[str | int]) -> ManifestError:
        mark = getattr(event, "start_mark", None)
        line = mark.line + 1 if mark is not None else None
        return ManifestError(message, path=format_path(path), line=line, document=self.document)

    def _document(self) -> Any:
        self.anchors.clear()
        self.count = 0
        stack: list[_Frame] = []
        root: list[Any] = []
        while True:
            event = self.loader.get_event()
            if isinstance(event, yaml.DocumentEndEvent):
                return root[0] if root else None
            path = self._child_path(stack, event)
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                mapping = isinstance(event, yaml.MappingStartEvent)
                want = _MAP if mapping else _SEQ
                if event.tag not in (None, "!", want):
                    raise self._error(
                        f"tag {cut(event.tag)} is not allowed (plain JSON types only)", event, path
                    )
                if stack and isinstance(stack[-1].value, dict) and not stack[-1].has_key:
                    raise self._error("keys must be strings, not mappings or lists", event, path)
                if len(stack) >= MAX_DEPTH:
                    raise self._error(f"nested deeper than {MAX_DEPTH} levels", event, path[:8])
                self._tick(1, event, path)
                value: dict[str, Any] | list[Any] = {} if mapping else []
                stack.append(_Frame(value, path, self.count, event.anchor))
                continue
            if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                frame = stack.pop()
                if isinstance(frame.value, dict):
                    for merged in frame.merges:
                        for k, v in merged.items():
                            frame.value.setdefault(k, v)
                if frame.anchor is not None:
                    self.anchors[frame.anchor] = (frame.value, self.count - frame.start_count + 1)
                self._place(stack, root, frame.value, event, frame.path)
                continue
            if isinstance(event, yaml.AliasEvent):
                if event.anchor not in self.anchors:
                    raise self._error(
                        f"alias *{cut(event.anchor)} has no complete anchor before it", event, path
                    )
                value, size = self.anchors[event.anchor]
                self._tick(size, event, path)
                self._place(stack, root, value, event, path)
                continue
            if isinstance(event, yaml.ScalarEvent):
                self._tick(1, event, path)
                is_key = bool(stack) and isinstance(stack[-1].value, dict) and not stack[-1].has_key
                scalar = self._scalar(event, path, is_key)
                if event.anchor is not None:
                    self.anchors[event.anchor] = (scalar, 1)
                self._place(stack, root, scalar, event, path)
                continue
            raise self._error(f"unexpected {type(event).__name__}", event, path)  # pragma: no cover

    def _child_path(self, stack: list[_Frame], event: Any) -> list[str | int]:
        if not stack:
            return []
        top = stack[-1]
        if isinstance(top.value, list):
            return [*top.path, len(top.value)]
        if top.has_key and not top.merge_next:
            return [*top.path, top.key]
        return list(top.path)

    def _tick(self, n: int, event: Any, path: list[str | int]) -> None:
        self.count += n
        if self.count > MAX_VALUES:
            raise self._error(
                f"more than {MAX_VALUES:,} values in one document (aliases count expanded)", event, path
            )

    def _place(
        self, stack: list[_Frame], root: list[Any], value: Any, event: Any, path: list[str | int]
    ) -> None:
        if not stack:
            root.append(value)
            return
        top = stack[-1]
        if isinstance(top.value, list):
            top.value.append(value)
            return
        if not top.has_key:
            self._key(top, value, event)
            return
        top.has_key = False
        if top.merge_next:
            top.merge_next = False
            sources = value if isinstance(value, list) else [value]
            if not all(isinstance(s, dict) for s in sources):
                raise self._error("'<<' merges only mappings", event, top.path)
            top.merges.extend(sources)
            return
        top.value[top.key] = value

    def _key(self, top: _Frame, key: Any, event: Any) -> None:
        line = event.start_mark.line + 1
        if key is _MERGE_KEY:
            top.has_key, top.merge_next = True, True
            return
        if not isinstance(key, str):
            hint = ""
            if isinstance(key, bool):
                hint = " (YAML reads unquoted yes/no/on/off/y/n/true/false as a boolean: quote the key)"
            raise self._error(f"keys must be strings, got {cut(key)}{hint}", event, top.path)
        assert isinstance(top.value, dict)
        if key in top.value:
            first = top.lines.get(key)
            raise self._error(f"duplicate key '{_key_text(key)}' (first on line {first})", event, top.path)
        top.lines[key] = line
        top.key, top.has_key = key, True

    def _scalar(self, event: Any, path: list[str | int], is_key: bool) -> Any:
        value: str = event.value
        if len(value) > MAX_SCALAR_CHARS:
            raise self._error(
                f"a value of {len(value):,} characters; at most {MAX_SCALAR_CHARS:,}", event, path
            )
        tag = event.tag
        if tag in (None, "!"):
            tag = self.loader.resolve(yaml.ScalarNode, value, event.implicit)
        if tag == _MERGE and is_key:
            return _MERGE_KEY
        if tag not in _SCALAR_TAGS:
            raise self._error(f"tag {cut(tag)} is not allowed (plain JSON types only)", event, path)
        if tag == _STR:
            plain = not is_key and event.implicit[0] and not event.style
            if plain and value in _YAML11_BOOLS:
                return _YAML11_BOOLS[value]
            if plain and len(value) <= _MAX_NUMBER_CHARS and _JSON_NUMBER.match(value):
                number = float(value)
                if not math.isfinite(number):
                    raise self._error(f"'{cut(value)}' is out of range", event, path)
                return number
            return value
        if tag == "tag:yaml.org,2002:timestamp":
            return value  # the API server keeps dates as strings
        if tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") and len(value) > _MAX_NUMBER_CHARS:
            raise self._error(f"a number of {len(value):,} characters is out of range", event, path)
        node = yaml.ScalarNode(tag, value, style=event.style)
        try:
            result = self.loader.yaml_constructors[tag](self.loader, node)
        except (ValueError, yaml.YAMLError):
            raise self._error(
                f"'{cut(value)}' is not a valid {tag.rsplit(':', 1)[-1]}", event, path
            ) from None
        if isinstance(result, float) and not math.isfinite(result):
            raise self._error(f"'{cut(value)}' is not allowed: numbers must be finite", event, path)
        return result


class _MergeKey:
    """The `<<` key of a YAML merge."""


_MERGE_KEY = _MergeKey()


def load_documents(data: bytes | str) -> list[Any]:
    """Every document of a YAML (or JSON) manifest; ManifestError with line and path on any problem.

    Empty documents are kept as None so document numbers match the file.
    """
    if isinstance(data, bytes):
        text = decode(data)
    else:
        if len(data) > MAX_BYTES:  # a str has at most 4 bytes per character; cheap and conservative
            size = len(data.encode("utf-8", "surrogatepass"))
            if size > MAX_BYTES:
                raise ManifestError(f"{_size(size)}; at most {_size(MAX_BYTES)}")
        text = data
    builder = _Builder(text)
    docs: list[Any] = []
    try:
        docs.extend(builder.documents())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = cut(str(exc.problem or exc.context or "syntax error"), 160)
        raise ManifestError(
            f"not valid YAML: {problem}",
            line=mark.line + 1 if mark else None,
            document=builder.document,
        ) from None
    except yaml.reader.ReaderError as exc:
        char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
        raise ManifestError(
            f"not valid YAML: character #x{char:04x} at position {exc.position} ({cut(exc.reason, 80)})",
            document=builder.document,
        ) from None
    except yaml.YAMLError as exc:
        text = " ".join(str(exc).split())
        raise ManifestError(f"not valid YAML: {cut(text, 160)}", document=builder.document) from None
    return docs


def load_one(data: bytes | str) -> Any:
    """The single document of a manifest; ManifestError if there are none or several."""
    docs = [d for d in load_documents(data) if d is not None]
    if len(docs) != 1:
        raise ManifestError(f"expected one document, found {len(docs)}")
    return docs[0]


def check_tree(value: Any, *, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES) -> None:
    """Refuse a parsed body (e.g. from the API server) that is too deep or too large to walk safely.

    Iterative, so it is itself safe at any depth; also refuses non-string keys and non-finite floats.
    """
    todo: list[tuple[Any, list[str | int]]] = [(value, [])]
    seen = 0
    while todo:
        node, path = todo.pop()
        seen += 1
        if seen > max_values:
            raise ManifestError(f"more than {max_values:,} values", path=format_path(path))
        if len(path) > max_depth:
            raise ManifestError(f"nested deeper than {max_depth} levels", path=_deep_path(path))
        if isinstance(node, (dict, list, tuple)) and seen + len(todo) + len(node) > max_values:
            raise ManifestError(f"more than {max_values:,} values", path=format_path(path))
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise ManifestError(f"keys must be strings, got {cut(k)}", path=format_path(path))
                todo.append((v, [*path, k]))
        elif isinstance(node, (list, tuple)):
            todo.extend((v, [*path, i]) for i, v in enumerate(node))
        elif isinstance(node, float) and not math.isfinite(node):
            raise ManifestError(f"{node} is not allowed: numbers must be finite", path=format_path(path))
