"""Whether this machine can run a target's kernels: the one place that asks torch about the device.

Kept apart from `esper.targets` (pure parsing, used by the operator and the validator without torch).
"""

from __future__ import annotations

from pathlib import Path

from esper.targets import X86_64_V4_FLAGS, Target

# ATen CPU capabilities that include AVX2.
_AVX2_CAPABILITIES = frozenset({"AVX2", "AVX512"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path | None = None) -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (its first "flags" line), or None where there is none."""
    try:
        text = (cpuinfo or CPUINFO).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return None


def _cuda_compute_capability(arch: str) -> tuple[int, int]:
    digits = arch.removeprefix("sm").removesuffix("a")
    return int(digits[:-1]), int(digits[-1])


def check_runtime(target: Target | str) -> str | None:
    """Return why this machine cannot run `target`'s kernels, or None if it can."""
    t = Target.parse(target)
    import torch

    if t.kind == "cpu":
        cap = torch.backends.cpu.get_cpu_capability()
        if cap not in _AVX2_CAPABILITIES:
            return f"target {t.name} needs a CPU with AVX2 (x86-64-v3); this CPU reports capability {cap}"
        if t.arch == "avx512":
            return _avx512_problem(t)
        return None
    if not torch.cuda.is_available():
        built = "without CUDA" if torch.version.cuda is None else f"with CUDA {torch.version.cuda}"
        return f"target {t.name} needs a CUDA GPU; none is available (torch {torch.__version__}, {built})"
    want = _cuda_compute_capability(str(t.arch))
    have = tuple(torch.cuda.get_device_capability())
    if have != want:
        gpu = torch.cuda.get_device_name()
        return (
            f"target {t.name} needs compute capability {want[0]}.{want[1]}; "
            f"this GPU ({gpu}) has {have[0]}.{have[1]}"
        )
    return None


def _avx512_problem(t: Target) -> str | None:
    flags = cpu_flags()
    if flags is None:
        return f"target {t.name} needs a CPU with AVX-512 (x86-64-v4); {CPUINFO} lists no CPU flags here"
    missing = [f for f in X86_64_V4_FLAGS if f not in flags]
    if missing:
        return (
            f"target {t.name} needs a CPU with AVX-512 (x86-64-v4); this CPU lacks {', '.join(missing)}: "
            "use target cpu here, or schedule onto an AVX-512 node"
        )
    return None
