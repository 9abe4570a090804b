"""Target parsing and the runtime capability check."""

from __future__ import annotations

import pytest
import torch

from esper.devices import check_runtime
from esper.targets import SUPPORTED_CUDA_ARCHS, Target


def test_parse_cpu() -> None:
    t = Target.parse("cpu")
    assert (t.kind, t.arch, t.name, t.capability, t.device) == ("cpu", None, "cpu", "cpu-avx2", "cpu")
    assert str(t) == "cpu"


@pytest.mark.parametrize("arch", SUPPORTED_CUDA_ARCHS)
def test_parse_cuda(arch: str) -> None:
    t = Target.parse(f"cuda-{arch}")
    assert (t.kind, t.arch, t.name, t.capability, t.device) == ("cuda", arch, f"cuda-{arch}", arch, "cuda")
    assert Target.parse(t) is t
    assert t == Target(kind="cuda", arch=arch)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("cuda", "expected 'cpu' or 'cuda-smNN'"),
        ("cuda-sm9", "expected 'cpu' or 'cuda-smNN'"),
        ("tpu", "expected 'cpu' or 'cuda-smNN'"),
        ("CPU", "lowercase"),
        ("cuda-SM90", "lowercase"),
        ("", "expected"),
        (" cpu", "expected"),
        ("cuda-sm91", "unsupported CUDA arch 'sm91'.*supported: sm70"),
        ("cuda-sm60", "unsupported CUDA arch"),
        ("cuda-sm80a", "unsupported CUDA arch"),
    ],
)
def test_parse_rejects(value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Target.parse(value)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ValueError):
        Target(kind="cuda", arch="sm91")
    with pytest.raises(ValueError):
        Target(kind="cpu", arch="sm90")


def test_cpu_runtime_needs_avx2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert check_runtime("cpu") is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    reason = check_runtime("cpu")
    assert reason is not None and "AVX2" in reason and "DEFAULT" in reason


def test_cuda_runtime_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = check_runtime("cuda-sm90")
    assert reason is not None and "cuda-sm90" in reason and "CUDA" in reason


def test_cuda_runtime_compute_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake H100")
    assert check_runtime("cuda-sm90") is None
    assert check_runtime("cuda-sm90a") is None
    reason = check_runtime("cuda-sm80")
    assert reason is not None and "8.0" in reason and "9.0" in reason and "Fake H100" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
    assert check_runtime("cuda-sm120") is None
    assert check_runtime("cuda-sm100") is not None


def test_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, esper.targets, esper.artifact, esper.storage; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
