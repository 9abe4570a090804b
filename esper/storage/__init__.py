"""Kernel bundle stores: `open_store(uri)` picks S3 or the local filesystem from a URI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from esper.storage.base import BundleNotFound, StorageError, Store
from esper.storage.local import LocalStore

# S3 bucket naming rules: 3-63 chars, lowercase letters, digits, dots, hyphens; alphanumeric at both ends.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix); ValueError naming what is wrong."""
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"invalid store URI {uri!r}: no bucket (expected s3://bucket/prefix)")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"invalid store URI {uri!r}: bucket name {bucket!r} must be 3-63 lowercase letters, "
            "digits, '.' or '-', starting and ending with a letter or digit"
        )
    return bucket, prefix.strip("/")


def open_store(uri: str, **kwargs: Any) -> Store:
    """Open the store a URI names: `s3://bucket/prefix`, `file:///path` or a plain path.

    Keyword arguments go to the store's constructor (e.g. S3Store's `client`, `max_attempts`).
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError("empty store URI (expected s3://bucket/prefix, file:///path or a path)")
    if uri.startswith("s3://"):
        from esper.storage.s3 import S3Store

        bucket, prefix = parse_s3_uri(uri)
        return S3Store(bucket, prefix, **kwargs)
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"invalid store URI {uri!r}: expected file:///absolute/path")
        return LocalStore(Path(unquote(parts.path)), **kwargs)
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise ValueError(
            f"unsupported store URI scheme {scheme!r} in {uri!r} "
            "(use s3://bucket/prefix, file:///path or a path)"
        )
    return LocalStore(Path(uri), **kwargs)


__all__ = ["BundleNotFound", "LocalStore", "StorageError", "Store", "open_store", "parse_s3_uri"]
