"""Loading and calling AOTInductor packages: one place for the runtime and the compiler's validation,
so the compile Job validates and benchmarks exactly what a trainer will run.

A package is native code (`dlopen`): verify its bundle (esper.artifact.verify_bundle) before loading.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

# A package loaded on a CPU with more than its ISA (AVX2 on AVX-512, AVX-512 on "AVX512 AVX512_VNNI")
# makes torch warn that the ISAs differ, "this could cause some issues": not so for a subset, and
# whether this CPU can run the package is checked from the manifest. Words of inductor's ISA names.
_IMPLIES = {"AVX512": {"AVX2"}}


def _isa_words(isa: str) -> set[str]:
    words = set(isa.upper().split())
    return words.union(*(_IMPLIES.get(w, set()) for w in words))


def isa_subset(package: str, here: str) -> bool:
    """Whether a package built for ISA `package` uses nothing beyond this CPU's ISA `here`."""
    return bool(package.strip()) and _isa_words(package) <= _isa_words(here)


def _not_an_isa_subset(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    return not (len(args) == 3 and args[0] == "AOTI_CPU_ISA" and isa_subset(str(args[2]), str(args[1])))


@contextlib.contextmanager
def no_isa_probe() -> Iterator[None]:
    """Skip inductor's gcc probe of every vector ISA on load (seconds per cold process), and its
    warning when a package's ISA is a subset of this CPU's.

    A package's code is already built; whether this CPU can run it is checked from the manifest
    (esper.targets.check_runtime), not by compiling probe programs nor by torch's metadata compare.
    """
    from torch._inductor import config

    package_log = logging.getLogger("torch.export.pt2_archive._package")
    package_log.addFilter(_not_an_isa_subset)
    try:
        with config.patch({"cpp.vec_isa_ok": True}):
            yield
    finally:
        package_log.removeFilter(_not_an_isa_subset)


class Package:
    """A loaded AOTInductor package, called as `pkg(*tensors, params)` like the exported program.

    It calls the runner's `boxed_run` on the flat tensor list directly: the stock Python wrapper
    re-parses the call spec JSON and walks pytrees on every call, which doubles the latency of a
    small CPU kernel (measured 31-46 µs -> 13-21 µs a call for a 32->64->32 MLP at batch 32).
    """

    def __init__(self, compiled: Any) -> None:
        from torch.utils import _pytree as pytree

        self.compiled = compiled
        self._run = compiled.loader.boxed_run
        out_spec = pytree.treespec_loads(compiled.loader.get_call_spec()[1])
        self._single = out_spec.is_leaf()

    def __call__(self, *args: Any) -> Any:
        out = self._run([*args[:-1], *args[-1]])
        return out[0] if self._single else tuple(out)


def load_package(path: Path | str, *, device_index: int | None = None) -> Package:
    """Load one package; `device_index` selects the CUDA device of a CUDA package."""
    from torch._inductor import aoti_load_package

    index = -1 if device_index is None else device_index  # -1 (torch's default): the current CUDA device
    with no_isa_probe():
        return Package(aoti_load_package(str(path), device_index=index))


def load_pair(
    forward: Path | str, backward: Path | str, *, device_index: int | None = None
) -> Sequence[Package]:
    """Two packages of a kernel bundle (a format v1 bundle's forward and backward)."""
    return load_package(forward, device_index=device_index), load_package(backward, device_index=device_index)


class SavedRef(Protocol):
    """Where a saved tensor comes from (esper.artifact.SavedSpec, esper.tezzeret.compile.Saved)."""

    @property
    def kind(self) -> str: ...
    @property
    def index(self) -> int: ...


def gather_saved(
    saved: Sequence[SavedRef], inputs: Sequence[Any], outputs: Sequence[Any], activations: Sequence[Any]
) -> list[Any]:
    """The training backward's leading arguments, in manifest order, from what the forward had."""
    pools = {"input": inputs, "output": outputs, "activation": activations}
    return [pools[s.kind][s.index] for s in saved]
