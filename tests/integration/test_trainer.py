"""The in-pod trainer closes the loop: a bundle the sidecar installs is germinated into a live model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esper.sidecar.index import IndexEntry, bundle_path, write_index
from esper.storage import open_store
from esper.tezzeret.entrypoint import main as tezzeret

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lora-adapter.yaml"


def test_a_delivered_kernel_is_germinated_between_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result_path = tmp_path / "result.json"
    code = tezzeret(
        [
            "--blueprint",
            str(EXAMPLE),
            "--target",
            "cpu",
            "--store",
            str(tmp_path / "store"),
            "--result-path",
            str(result_path),
        ]
    )
    assert code == 0
    result = json.loads(result_path.read_text())
    kernel_dir = tmp_path / "shared"
    store = open_store(str(tmp_path / "store"))
    store.fetch_bundle(
        result["key"], bundle_path(kernel_dir, "cpu-lora"), expected_sha256=result["manifestSha256"]
    )
    entry = IndexEntry(
        name="cpu-lora",
        namespace="default",
        key=result["key"],
        sha256=result["manifestSha256"],
        target="cpu",
        blueprint="lora-64-r8",
        path="kernels/cpu-lora",
        size=result["size"],
    )
    write_index(kernel_dir, [entry], version=1)
    capsys.readouterr()

    from esper.demo.trainer import main

    assert (
        main(["--kernel-dir", str(kernel_dir), "--steps", "2500", "--slots", "1", "--metrics-port", "0"]) == 0
    )
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "stop"
    arrived = [e for e in events if e["event"] == "kernel-arrived"]
    assert [e["key"] for e in arrived] == [result["key"]]
    germinated = [e for e in events if e["event"] == "germinate"]
    assert germinated and germinated[0]["kernel"] == result["key"]
    assert germinated[0]["step"] > arrived[0]["step"]
