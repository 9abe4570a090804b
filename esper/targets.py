"""Compile targets ("cpu", "cuda-sm90", ...) and whether this machine can run them.

A target names what a kernel is compiled for, and its capability is part of the kernel key. "cpu"
kernels are pinned to AVX2 so one kernel runs on any x86-64-v3 node; "cpu-avx512" kernels use 512-bit
vectors (x86-64-v4: AVX-512 F, BW, CD, DQ, VL, nothing newer) and run only on nodes that have them.
CUDA kernels are matched to the exact compute capability: Triton/AOTInductor cubins are built for one
architecture, and the "a" variants (sm90a) are not forward-compatible at all.

No torch here: the operator imports this module to compute kernel keys. Whether this machine can run
a target is `esper.devices.check_runtime`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

CPU_CAPABILITY = "cpu-avx2"
CPU_ARCHS: dict[str | None, str] = {None: CPU_CAPABILITY, "avx512": "cpu-avx512"}  # arch -> capability
SUPPORTED_CUDA_ARCHS: tuple[str, ...] = (
    "sm70", "sm75", "sm80", "sm86", "sm87", "sm89", "sm90", "sm90a", "sm100", "sm120",
)  # fmt: skip
_CUDA_RE = re.compile(r"^cuda-(sm[0-9]{2,3}a?)$")
_ACCEPTED = "'cpu', 'cpu-avx512' or 'cuda-smNN' such as 'cuda-sm90'"
# x86-64-v4 over v3, what "cpu-avx512" kernels are compiled for (gcc -march=x86-64-v4), as /proc/cpuinfo
# names the flags (Node Feature Discovery labels nodes with their upper-case forms).
X86_64_V4_FLAGS = ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")


@dataclass(frozen=True, slots=True)
class Target:
    """A compile target: kind "cpu" (arch None: AVX2, or "avx512") or "cuda" with an arch such as "sm90"."""

    kind: Literal["cpu", "cuda"]
    arch: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "cpu":
            if self.arch not in CPU_ARCHS:
                raise ValueError(f"a cpu target's arch is 'avx512' or none (got {self.arch!r})")
        elif self.kind == "cuda":
            if self.arch not in SUPPORTED_CUDA_ARCHS:
                raise ValueError(
                    f"unsupported CUDA arch {self.arch!r}; supported: {', '.join(SUPPORTED_CUDA_ARCHS)}"
                )
        else:
            raise ValueError(f"unknown target kind {self.kind!r}; expected 'cpu' or 'cuda'")

    @classmethod
    def parse(cls, value: str | Target) -> Target:
        """Parse "cpu", "cpu-avx512" or "cuda-smNN[a]"; a ValueError says what is wrong and what is
        accepted."""
        if isinstance(value, Target):
            return value
        if not isinstance(value, str):
            raise ValueError(f"a target is a string such as 'cpu' or 'cuda-sm90', not {type(value).__name__}")
        if value == "cpu":
            return cls(kind="cpu")
        if value == "cpu-avx512":
            return cls(kind="cpu", arch="avx512")
        m = _CUDA_RE.fullmatch(value)
        if m is None:
            hint = " (targets are lowercase)" if value.lower() != value else ""
            raise ValueError(f"invalid target {value!r}{hint}: expected {_ACCEPTED}")
        arch = m.group(1)
        if arch not in SUPPORTED_CUDA_ARCHS:
            raise ValueError(
                f"unsupported CUDA arch {arch!r} in target {value!r}; "
                f"supported: {', '.join(SUPPORTED_CUDA_ARCHS)}"
            )
        return cls(kind="cuda", arch=arch)

    @property
    def name(self) -> str:
        """The canonical string form, as written in Blueprints: "cpu", "cpu-avx512" or "cuda-sm90"."""
        if self.kind == "cpu":
            return "cpu" if self.arch is None else f"cpu-{self.arch}"
        return f"cuda-{self.arch}"

    @property
    def capability(self) -> str:
        """The device capability compiled for, recorded in the toolchain and the kernel key."""
        return CPU_ARCHS[self.arch] if self.kind == "cpu" else str(self.arch)

    @property
    def device(self) -> str:
        """The torch device type: "cpu" or "cuda"."""
        return self.kind

    def __str__(self) -> str:
        return self.name


def parse_targets(value: str | Iterable[str]) -> tuple[str, ...]:
    """Targets from a comma-separated string or a list: canonical names in order, each once, blanks
    skipped; a ValueError names the first one that is not a target."""
    items = [t.strip() for t in value.split(",")] if isinstance(value, str) else list(value)
    return tuple(dict.fromkeys(Target.parse(t).name for t in items if t))
