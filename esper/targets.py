"""Compile targets ("cpu", "cuda-sm90", ...) and whether this machine can run them.

A target names what a kernel is compiled for, and its capability is part of the kernel key. CPU kernels
are pinned to AVX2 so one CPU kernel runs on any x86-64-v3 node. CUDA kernels are matched to the exact
compute capability: Triton/AOTInductor cubins are built for one architecture, and the "a" variants
(sm90a) are not forward-compatible at all.

torch is imported lazily: the operator imports this module to compute kernel keys without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

CPU_CAPABILITY = "cpu-avx2"
SUPPORTED_CUDA_ARCHS: tuple[str, ...] = (
    "sm70", "sm75", "sm80", "sm86", "sm87", "sm89", "sm90", "sm90a", "sm100", "sm120",
)  # fmt: skip
_CUDA_RE = re.compile(r"^cuda-(sm[0-9]{2,3}a?)$")
# ATen CPU capabilities that include AVX2.
_AVX2_CAPABILITIES = frozenset({"AVX2", "AVX512"})


@dataclass(frozen=True, slots=True)
class Target:
    """A compile target: kind "cpu" (arch None) or "cuda" with an arch such as "sm90"."""

    kind: Literal["cpu", "cuda"]
    arch: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "cpu":
            if self.arch is not None:
                raise ValueError(f"a cpu target has no arch (got {self.arch!r})")
        elif self.kind == "cuda":
            if self.arch not in SUPPORTED_CUDA_ARCHS:
                raise ValueError(
                    f"unsupported CUDA arch {self.arch!r}; supported: {', '.join(SUPPORTED_CUDA_ARCHS)}"
                )
        else:
            raise ValueError(f"unknown target kind {self.kind!r}; expected 'cpu' or 'cuda'")

    @classmethod
    def parse(cls, value: str | Target) -> Target:
        """Parse "cpu" or "cuda-smNN[a]"; a ValueError says what is wrong and what is accepted."""
        if isinstance(value, Target):
            return value
        if not isinstance(value, str):
            raise ValueError(f"a target is a string such as 'cpu' or 'cuda-sm90', not {type(value).__name__}")
        if value == "cpu":
            return cls(kind="cpu")
        m = _CUDA_RE.match(value)
        if m is None:
            hint = " (targets are lowercase)" if value.lower() != value else ""
            raise ValueError(
                f"invalid target {value!r}{hint}: expected 'cpu' or 'cuda-smNN' such as 'cuda-sm90'"
            )
        arch = m.group(1)
        if arch not in SUPPORTED_CUDA_ARCHS:
            raise ValueError(
                f"unsupported CUDA arch {arch!r} in target {value!r}; "
                f"supported: {', '.join(SUPPORTED_CUDA_ARCHS)}"
            )
        return cls(kind="cuda", arch=arch)

    @property
    def name(self) -> str:
        """The canonical string form, as written in Blueprints: "cpu" or "cuda-sm90"."""
        return "cpu" if self.kind == "cpu" else f"cuda-{self.arch}"

    @property
    def capability(self) -> str:
        """The device capability compiled for, recorded in the toolchain and the kernel key."""
        return CPU_CAPABILITY if self.kind == "cpu" else str(self.arch)

    @property
    def device(self) -> str:
        """The torch device type: "cpu" or "cuda"."""
        return self.kind

    def runtime_capability_ok(self) -> bool:
        """Whether this machine can run kernels of this target (see `check_runtime` for why not)."""
        return check_runtime(self) is None

    def __str__(self) -> str:
        return self.name


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
            return f"target cpu needs a CPU with AVX2 (x86-64-v3); this CPU reports capability {cap}"
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
