"""Shared fixtures: the S3 server (moto) and, where tests ask for it, the emulated cluster."""

from __future__ import annotations

import os

# Compiles in tests share one inductor cache: the same graph compiles once per run, not once per test.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.getcwd(), ".esper", "test-inductor-cache"))

from tests.support.s3 import s3_bucket, s3_server  # noqa: E402

__all__ = ["s3_bucket", "s3_server"]
