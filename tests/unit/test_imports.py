"""Import boundaries: the library runs without kopf, the operator's logic and the sidecar without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize(
    "statement",
    [
        "import esper.cli.main",
        "import esper.kasmina, esper.kasmina.seed, esper.kasmina.sync",
        "import esper.tezzeret.entrypoint, esper.demo",
    ],
)
def test_the_library_never_imports_kopf(statement: str) -> None:
    assert "kopf" not in loaded_after(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "import esper_operator.plan, esper_operator.jobs, esper_operator.status",
        "import esper.kasmina.sync, esper.kasmina.inject, esper.kasmina.index",
        "import esper.blueprint, esper.contracts.validation, esper.artifact, esper.storage",
    ],
)
def test_validation_planning_and_the_sidecar_do_not_need_torch(statement: str) -> None:
    assert "torch" not in loaded_after(statement)
