"""The in-pod trainer under torchrun (2 ranks, gloo): a delivered kernel is grown on both ranks at once.

As in a PyTorchJob or TrainJob pod (`torchrun --no-python esper kasmina train`), here with both ranks
on this machine sharing one kernel directory. Slow: one real compile.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from esper.sidecar.index import IndexEntry, bundle_path, write_index
from esper.storage import open_store
from esper.tezzeret.entrypoint import main as tezzeret

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lora-adapter.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_two_ranks_grow_a_delivered_kernel_at_the_same_step(tmp_path: Path) -> None:
    result_path = tmp_path / "result.json"
    argv = ["--blueprint", str(EXAMPLE), "--target", "cpu", "--store", str(tmp_path / "store")]
    assert tezzeret([*argv, "--result-path", str(result_path)]) == 0
    result = json.loads(result_path.read_text())
    kernel_dir = tmp_path / "shared"
    open_store(str(tmp_path / "store")).fetch_bundle(
        result["key"], bundle_path(kernel_dir, "cpu-lora"), expected_sha256=result["manifestSha256"]
    )
    entry = IndexEntry(
        name="cpu-lora", namespace="default", key=result["key"], sha256=result["manifestSha256"],
        target="cpu", blueprint="lora-64-r8", path="kernels/cpu-lora", size=result["size"],
    )  # fmt: skip
    write_index(kernel_dir, [entry], version=1)

    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'operator'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--max-restarts=0", "-m", "esper.cli.main", "kasmina", "train", "--kernel-dir", str(kernel_dir),
           "--steps", "1200", "--slots", "1", "--metrics-port", "0"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert events[0]["event"] == "start" and events[0]["world"] == 2 and events[-1]["event"] == "stop"
    germinated = [e for e in events if e["event"] == "germinate"]
    assert germinated and germinated[0]["kernel"] == result["key"]
    # Each rank logs its own transition: both at the step rank 0 printed.
    steps = re.findall(r"seed blocks\.0: dormant -> germinated at step (\d+)", out)
    assert steps == [str(germinated[0]["step"])] * 2
