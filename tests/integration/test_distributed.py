"""Growth under data parallelism, for real: `torchrun --nproc-per-node 2`, gloo, CPU.

Each test launches `tests.support.ddp_worker` under torchrun (its own process group timeout 60 s,
the subprocess killed at `RUN_TIMEOUT`, pytest-timeout above that), so a hang fails fast. Every rank
checks after every optimizer step that all ranks' parameters are bit-identical (a sha256 compared
by all_gather) and raises otherwise; the tests read each rank's JSON report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import ddp_worker

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 150
pytestmark = pytest.mark.timeout(3 * RUN_TIMEOUT)


def torchrun(out: Path, scenario: str, *args: str, nproc: int = 2) -> list[dict[str, Any]]:
    """Run the worker on `nproc` ranks; each rank's report, by rank."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'operator'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "--monitor-interval=0.5", "--rdzv-conf=join_timeout=60",  # ranks join in 60 s
           "-m", "tests.support.ddp_worker", "--scenario", scenario, "--out", str(out), *args]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun {scenario} hung for {RUN_TIMEOUT}s:\n{log[-4000:]}")
    assert proc.returncode == 0, f"torchrun {scenario} failed ({proc.returncode}):\n{log[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def assert_same_everywhere(reports: list[dict[str, Any]], steps: int) -> None:
    first = reports[0]
    for r in reports[1:]:
        assert r["events"] == first["events"]
        assert r["digests"] == first["digests"]  # every step, every rank: the same parameter bytes
        assert r["states"] == first["states"] and r["keys"] == first["keys"]
        assert r["seedParams"] == first["seedParams"]
        assert r["finalVal"] == first["finalVal"]
    assert all(r["inSyncChecks"] == steps for r in reports)
    assert len(first["digests"]) == steps and len(set(first["digests"])) == steps  # it did train


def kinds(events: list[dict[str, Any]]) -> list[tuple[int, str, str | None, str | None]]:
    return [(e["step"], e["event"], e.get("slot"), e.get("kernel")) for e in events]


def test_two_ranks_grow_the_same_seeds_bit_identically_and_match_one_process(tmp_path: Path) -> None:
    reports = torchrun(tmp_path, "grow")
    assert_same_everywhere(reports, 240)
    events = reports[0]["events"]
    # Two kernels, two slots, every evaluation a plateau: both slots get a seed, trained and kept.
    assert [e for e in kinds(events) if e[1] in ("germinate", "fossilize")] == [
        (30, "germinate", "2", "mlp-a"), (70, "fossilize", "2", "mlp-a"),
        (80, "germinate", "3", "mlp-a"), (120, "fossilize", "3", "mlp-a"),
    ]  # fmt: skip
    assert reports[0]["states"] == {"2": "fossilized", "3": "fossilized"}

    # The same global batches in one process, no torch.distributed: the same decisions, and a
    # validation loss that differs only by the order of the gradient sums.
    single = ddp_worker.grow_run(ddp_worker.parse([]), world=1)
    assert kinds(single["events"]) == kinds(events)
    assert abs(reports[0]["finalVal"] - single["finalVal"]) <= 0.02 * single["finalVal"]
    host_alone = ddp_worker.grow_run(ddp_worker.parse(["--min-delta=-1e9"]), world=1)  # never grows
    assert host_alone["events"] == []
    assert reports[0]["finalVal"] < host_alone["finalVal"]


def test_a_late_kernel_on_one_rank_delays_germination_and_never_splits_the_ranks(tmp_path: Path) -> None:
    reports = torchrun(tmp_path, "late", "--late-step", "100", "--steps", "160")
    assert_same_everywhere(reports, 160)
    ks = kinds(reports[0]["events"])
    # Plateaus before step 100 find no kernel every rank holds; the first evaluation after rank 1's
    # delivery (plateau counter permitting) grows one.
    assert (30, "no_kernel", None, None) in ks
    germinated = [k for k in ks if k[1] == "germinate"]
    assert germinated and germinated[0][0] >= 100
    assert all(k[0] < 100 for k in ks if k[1] == "no_kernel")


def test_a_kernel_refused_on_one_rank_is_refused_on_all(tmp_path: Path) -> None:
    reports = torchrun(tmp_path, "refuse", "--steps", "60")
    assert_same_everywhere(reports, 60)
    ks = kinds(reports[0]["events"])
    assert ks[:3] == [(30, "plateau", None, None), (30, "germinate_failed", "2", "mlp-a"),
                      (30, "germinate", "2", "mlp-bb")]  # fmt: skip
    # rank 0 loaded it; the reason every rank records is rank 1's
    assert reports[0]["events"][1]["reason"] == (
        "refused on rank 1: LoadFailed: OSError: bundle unreadable on this node"
    )
    assert reports[0]["keys"]["2"] == "mlp-bb"


def test_a_seed_failing_on_one_rank_is_culled_on_all(tmp_path: Path) -> None:
    reports = torchrun(tmp_path, "fail", "--steps", "60", "--fail-after", "5")
    assert_same_everywhere(reports, 60)
    culls = [e for e in reports[0]["events"] if e["event"] == "cull"]
    # germinated at 30, the 6th training forward on rank 1 raises (step 36): culled everywhere.
    assert culls and culls[0]["step"] == 36 and culls[0]["slot"] == "2"
    assert culls[0]["reason"] == "SeedError on 1 of 2 ranks"


def test_a_seed_failing_on_one_rank_while_it_is_judged_is_culled_on_all(tmp_path: Path) -> None:
    # The seed's evaluation-mode forwards on each rank: the probe at germination (1), then 4 chunks
    # of 64 per evaluation of the rank's 256 samples. Blending from step 50: the evaluations at 50
    # and 60 make calls 2-9; at 70 the blend ends and the policy measures val(alpha=0) (no seed
    # call) and val(alpha=1): rank 1 fails there, at call 10.
    reports = torchrun(tmp_path, "fail-eval", "--steps", "80", "--fail-after", "9")
    assert_same_everywhere(reports, 80)
    ks = kinds(reports[0]["events"])
    assert (70, "cull", "2", "mlp-a") in ks and not any(k[1] == "fossilize" for k in ks)
    cull = next(e for e in reports[0]["events"] if e["event"] == "cull")
    assert cull["contribution"] > -0.1  # rank 0 alone would have kept it (cull threshold -0.1)
    assert (80, "germinate", "2", "mlp-bb") in ks  # the slot is free again, on every rank
    assert reports[0]["states"]["2"] == "training"


def test_a_checkpoint_from_two_ranks_restores_on_one_and_on_two(tmp_path: Path) -> None:
    import torch

    saved = torchrun(tmp_path / "save", "checkpoint", "--steps", "110")
    assert_same_everywhere(saved, 110)
    ckpt = tmp_path / "save" / "ckpt.pt"
    state = torch.load(ckpt, weights_only=False)
    assert saved[0]["states"]["3"] == "blending"  # a live seed, with its param group and Adam state
    assert state["digest"] == saved[0]["digests"][-1]

    one = torchrun(tmp_path / "one", "restore", "--ckpt", str(ckpt), "--steps", "40", nproc=1)
    two = torchrun(tmp_path / "two", "restore", "--ckpt", str(ckpt), "--steps", "40")
    assert_same_everywhere(two, 40)
    assert one[0]["restoredDigest"] == two[0]["restoredDigest"] == two[1]["restoredDigest"] == state["digest"]
    # The run goes on from the same step on either rank count: the seed blends and is decided.
    assert kinds(one[0]["events"]) == kinds(two[0]["events"])
    assert (120, "fossilize", "3", "mlp-a") in kinds(two[0]["events"])
    assert abs(one[0]["finalVal"] - two[0]["finalVal"]) <= 0.02 * one[0]["finalVal"]


@pytest.mark.slow
def test_a_compiled_kernel_grows_on_two_ranks(mlp_bundle: tuple[Path, str], tmp_path: Path) -> None:
    """The real thing: an AOTInductor kernel (the 16 -> 32 -> 16 MLP of tests.support.kernels)."""
    from esper import artifact

    bundle, sha = mlp_bundle
    reports = torchrun(tmp_path / "run", "bundle", "--bundle", str(bundle), "--sha256", sha, "--steps", "100")
    assert_same_everywhere(reports, 100)
    key = artifact.read_manifest(bundle).key
    ks = kinds(reports[0]["events"])
    assert (30, "germinate", "2", key) in ks and (50, "blending", "2", key) in ks
    assert any(k[0] == 70 and k[1] in ("fossilize", "cull") and k[3] == key for k in ks)  # judged at 70
