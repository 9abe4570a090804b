"""`run_demo(quick=True)`: one real compile, then host / grown / large training, tables, PNG, JSON.

Slow: the compile is one AOTInductor forward + backward build (~30 s on 2 cores; less with the shared
inductor cache of tests/conftest.py). The grown run must germinate the compiled kernel itself (a
KernelModule loaded from the store's bundle), not an eager stand-in.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from esper.demo import DemoResult, run_demo
from esper.storage import open_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, str]:
    out = io.StringIO()
    workdir = tmp_path_factory.mktemp("demo")
    result = run_demo(workdir, quick=True, console=Console(file=out, width=160))
    return result, out.getvalue()


def test_writes_png_and_json_with_three_runs(demo: tuple[DemoResult, str]) -> None:
    result, printed = demo
    assert result.png is not None and result.png.is_file()
    assert result.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(result.json_path.read_text())
    assert set(doc["runs"]) == {"host", "grown", "large"}
    for name, run in doc["runs"].items():
        assert run["steps"] == result.config.steps, name
        assert math.isfinite(run["valLoss"]) and math.isfinite(run["trainLoss"]), name
        assert all(math.isfinite(v) for _, v in run["curve"]), name
        assert run["params"] > 0
    assert doc["runs"]["large"]["params"] > doc["runs"]["host"]["params"]
    for title in ("Kernels", "Training runs", "Seed events"):
        assert title in printed


def test_grown_run_germinates_a_real_compiled_kernel_from_the_store(demo: tuple[DemoResult, str]) -> None:
    result, _ = demo
    keys = set(open_store(str(result.workdir / "store")).list_keys())
    assert len(keys) == 1
    germinated = [e for e in result.events if e["event"] == "germinate"]
    assert germinated, f"no germination; events: {result.events}"
    first = germinated[0]
    assert first["kernel"] in keys
    assert first["compiled"] is True  # a KernelModule: AOTInductor forward and backward
    assert first["loadSeconds"] is not None and first["loadSeconds"] < 5
    doc = json.loads(result.json_path.read_text())
    assert any(e["event"] == "germinate" and e["kernel"] in keys for e in doc["events"])


def test_second_run_reuses_the_store(demo: tuple[DemoResult, str], tmp_path: Path) -> None:
    """The compile step skips bundles already in the store (no compile the second time)."""
    from esper.demo import compile_kernels

    result, _ = demo
    kernels = compile_kernels(result.config.examples, result.workdir, Console(file=io.StringIO()))
    assert [k.cached for k in kernels] == [True]
    assert kernels[0].key == result.kernels[0].key and kernels[0].bundle is not None


def test_two_workers_grow_the_same_seeds_as_one_process(demo: tuple[DemoResult, str], tmp_path: Path) -> None:
    """`esper demo --workers 2`: the grown run again on 2 torchrun ranks (gloo), the store reused."""
    result, _ = demo
    out = io.StringIO()
    two = run_demo(tmp_path, quick=True, console=Console(file=out, width=160),
                   store=result.workdir / "store", workers=2)  # fmt: skip
    assert two.distributed is not None
    one, dp = two.runs["grown"], two.runs["grown x2"]
    key = [(e["step"], e["event"], e.get("slot"), e.get("kernel")) for e in two.events]
    assert [(e["step"], e["event"], e.get("slot"), e.get("kernel")) for e in two.distributed["events"]] == key
    assert any(e["event"] == "germinate" and e.get("compiled") for e in two.distributed["events"])
    assert two.distributed["inSyncChecks"] == two.config.steps + 1  # every step, bit-identical ranks
    # Same global batches, split across the ranks: only the order of the gradient sums differs.
    assert abs(dp.val_loss - one.val_loss) <= 0.01 * one.val_loss
    assert dp.val_loss < two.runs["host"].val_loss
    assert "grown on 2 workers" in out.getvalue()
    assert json.loads(two.json_path.read_text())["distributed"]["sameEvents"] is True
