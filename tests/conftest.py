"""Shared fixtures: the S3 server (moto) and the emulated cluster (tests.support.cluster)."""

from __future__ import annotations

import os

import pytest

# Compiles in tests share one inductor cache: the same graph compiles once per run, not once per test.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.getcwd(), ".esper", "test-inductor-cache"))

from tests.support.s3 import s3_bucket, s3_server

pytest_plugins = ["tests.support.cluster"]
__all__ = ["s3_bucket", "s3_server"]


# Property tests explore new inputs on developers' machines; CI replays a fixed set so a run that
# passed once passes again (a failure found locally is kept by hypothesis's example database).
if os.environ.get("CI"):
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, database=None)
    _hypothesis_settings.load_profile("ci")


# Local signing keys (esper.signing) go to a per-run directory, never the developer's ~/.config.
if not os.environ.get("ESPER_KEY_DIR"):
    import tempfile as _tempfile

    os.environ["ESPER_KEY_DIR"] = _tempfile.mkdtemp(prefix="esper-test-keys-")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Line coverage per package, when the run measured it (`make test` passes --cov)."""
    if not getattr(config.option, "cov_source", None):
        return
    from tests.coverage_summary import table

    lines = table()
    if lines:
        terminalreporter.write_sep("-", "line coverage per package (in-process code only)")
        for line in lines:
            terminalreporter.write_line(line)
