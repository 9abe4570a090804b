"""Fixtures shared by the integration modules: one compiled kernel per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper import artifact
from tests.support.kernels import compile_bundle


@pytest.fixture(scope="session")
def mlp_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(bundle directory, manifest sha256) of the MLP kernel of tests.support.kernels."""
    d = tmp_path_factory.mktemp("kasmina") / "bundle"
    compile_bundle(d)
    return d, artifact.sha256_bytes((d / artifact.MANIFEST).read_bytes())
