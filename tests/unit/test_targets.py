"""Target parsing and the runtime capability check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from esper import devices
from esper.contracts.blueprint import TARGET_PATTERN
from esper.devices import check_runtime, cpu_flags
from esper.targets import SUPPORTED_CUDA_ARCHS, Target


def test_parse_cpu() -> None:
    t = Target.parse("cpu")
    assert (t.kind, t.arch, t.name, t.capability, t.device) == ("cpu", None, "cpu", "cpu-avx2", "cpu")
    assert str(t) == "cpu"


def test_parse_cpu_avx512() -> None:
    t = Target.parse("cpu-avx512")
    assert (t.kind, t.arch, t.name, t.capability, t.device) == (
        "cpu",
        "avx512",
        "cpu-avx512",
        "cpu-avx512",
        "cpu",
    )
    assert Target.parse(t) is t and t != Target.parse("cpu")


@pytest.mark.parametrize("arch", SUPPORTED_CUDA_ARCHS)
def test_parse_cuda(arch: str) -> None:
    t = Target.parse(f"cuda-{arch}")
    assert (t.kind, t.arch, t.name, t.capability, t.device) == ("cuda", arch, f"cuda-{arch}", arch, "cuda")
    assert Target.parse(t) is t
    assert t == Target(kind="cuda", arch=arch)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("cuda", "expected 'cpu', 'cpu-avx512' or 'cuda-smNN'"),
        ("cuda-sm9", "expected 'cpu', 'cpu-avx512' or 'cuda-smNN'"),
        ("tpu", "expected 'cpu', 'cpu-avx512' or 'cuda-smNN'"),
        ("cpu-avx2", "expected"),  # AVX2 is plain "cpu": one name per kernel key
        ("cpu-avx512f", "expected"),
        ("cpu-AVX512", "lowercase"),
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
    with pytest.raises(ValueError):
        Target(kind="cuda", arch="avx512")


def test_cpu_runtime_needs_avx2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert check_runtime("cpu") is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    reason = check_runtime("cpu")
    assert reason is not None and "AVX2" in reason and "DEFAULT" in reason


V4 = "fpu sse2 avx avx2 fma f16c bmi1 bmi2 movbe avx512f avx512bw avx512cd avx512dq avx512vl avx512_vnni"


def _cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    monkeypatch.setattr(devices, "CPUINFO", path)


def test_cpu_flags_reads_the_first_flags_line(tmp_path: Path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nflags\t\t: fpu avx2  avx512f\nbugs\t\t: spectre\nflags\t: other\n")
    assert cpu_flags(path) == frozenset({"fpu", "avx2", "avx512f"})
    path.write_text("processor\t: 0\nFeatures\t: neon\n")  # an Arm /proc/cpuinfo
    assert cpu_flags(path) is None
    assert cpu_flags(tmp_path / "missing") is None


def test_cpu_avx512_runtime_needs_every_x86_64_v4_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    _cpuinfo(tmp_path, monkeypatch, f"processor\t: 0\nflags\t\t: {V4}\n")
    assert check_runtime("cpu-avx512") is None and check_runtime("cpu") is None
    for flag in ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"):
        _cpuinfo(tmp_path, monkeypatch, "flags\t: " + " ".join(f for f in V4.split() if f != flag) + "\n")
        reason = check_runtime("cpu-avx512")
        assert reason is not None and f"lacks {flag}:" in reason and "x86-64-v4" in reason, flag
        assert check_runtime("cpu") is None  # AVX2 kernels still run there
    _cpuinfo(tmp_path, monkeypatch, "processor\t: 0\n")
    reason = check_runtime("cpu-avx512")
    assert reason is not None and "lists no CPU flags" in reason
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    _cpuinfo(tmp_path, monkeypatch, f"flags\t: {V4}\n")
    reason = check_runtime("cpu-avx512")
    assert reason is not None and "AVX2" in reason and "DEFAULT" in reason


@given(st.one_of(
    st.sampled_from(["cpu", "cpu-avx512", "cpu-avx2", "cuda-sm90", "cuda-sm90a", "cuda-sm100", "cuda-sm9"]),
    st.text(alphabet="cpuavx512-dsm9a ", max_size=12),
))  # fmt: skip
def test_the_manifest_pattern_accepts_what_parse_accepts(value: str) -> None:
    """The CRD's pattern admits a syntax; parse also knows which CUDA archs exist (a subset)."""
    try:
        Target.parse(value)
        parsed = True
    except ValueError:
        parsed = False
    matched = re.fullmatch(TARGET_PATTERN, value) is not None
    assert matched or not parsed
    if matched and not value.startswith("cuda-"):
        assert parsed


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
