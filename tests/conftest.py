"""Shared fixtures: the S3 server (moto) and the emulated cluster (tests.support.cluster)."""

from __future__ import annotations

import os

# Compiles in tests share one inductor cache: the same graph compiles once per run, not once per test.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.getcwd(), ".esper", "test-inductor-cache"))

from tests.support.s3 import s3_bucket, s3_server

pytest_plugins = ["tests.support.cluster"]
__all__ = ["s3_bucket", "s3_server"]
