"""Import boundaries: the library runs without kopf, the operator's logic and the sidecar without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize(
    "statement",
    [
        "import esper.cli.main",
        "import esper.kasmina, esper.kasmina.seed, esper.sidecar.sync",
        "import esper.tezzeret.entrypoint, esper.demo",
    ],
)
def test_the_library_never_imports_kopf(statement: str) -> None:
    assert "kopf" not in loaded_after(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "import esper_operator.plan, esper_operator.jobs, esper_operator.status",
        "import esper.sidecar.sync, esper.sidecar.config, esper.sidecar.index, esper.sidecar.server, "
        "esper.sidecar.inject",
        "import esper.blueprint, esper.contracts.validation, esper.artifact, esper.storage",
    ],
)
def test_validation_planning_and_the_sidecar_do_not_need_torch(statement: str) -> None:
    assert "torch" not in loaded_after(statement)


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("esper/kasmina/telemetry.py", "esper.kasmina.seed"),
        ("esper/blueprint/opdef.py", "esper.blueprint.torch_ops"),
    ],
)
def test_lower_modules_do_not_import_back_up(lower: str, higher: str) -> None:
    """seed uses telemetry and torch_ops uses opdef; an import the other way would close a circle."""
    assert higher not in imported_modules(REPO / lower)


def test_the_sidecar_does_not_import_the_runtime() -> None:
    for path in (REPO / "esper" / "sidecar").glob("*.py"):
        assert not {m for m in imported_modules(path) if m.startswith("esper.kasmina")}, path.name
