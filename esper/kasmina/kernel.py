"""Loading compiled kernels: verify the bundle, check it fits this machine, wrap it as an nn.Module.

A `KernelModule` owns the kernel's parameters as ordinary nn.Parameters (so any optimizer trains them
and state_dict saves them). When a backward can follow (grad enabled and an input or a parameter
requires grad) it runs the training forward package inside a custom autograd Function that saves the
activations the package returns (the manifest's `saved` list) and whose backward runs the training
backward package on them; otherwise (no_grad, inference_mode, frozen seed) it runs the inference
forward package alone. A format v1 bundle has no training packages: its backward package recomputes
the forward, so only inputs and parameters are saved (activation-checkpointing memory, 2x forward).

First load in a process: `aoti_load_package` probes the CPU's vector ISA by compiling tiny programs
with the C++ compiler (~2 s here), and importing torch._inductor costs ~2 s more. `warmup()` pays both
at trainer start-up so the first hot-load in the training loop takes milliseconds.

Every call is guarded: a compiled package reads its inputs as raw buffers of the shape and dtype it
was compiled for, so a wrong tensor gives garbage or an out-of-bounds read, not an error. Before any
package runs, each input is checked against the manifest's `inputs` (rank; the batch dim within
1..maxBatch and equal across inputs; every other dim exact; dtype; device; strided layout) and each
grad output against `outputs`; a mismatch raises `KernelShapeError`. A non-contiguous input is copied
to a contiguous one (one copy of a tensor of a size the kernel accepts). Parameters are checked at
load and again at the first call after anything that can swap them (`.to()`, `.half()`,
`load_state_dict`), not on every call. The check costs about 2 µs per call on the build machine
(`python benchmarks/kasmina.py --guard-only`).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from esper.aoti import gather_saved
from esper.kasmina.telemetry import KasminaMetrics, default_metrics

if TYPE_CHECKING:
    from esper.artifact import Manifest
    from esper.signing import TrustedKeys

log = logging.getLogger("esper.kasmina")

_loads_in_process = 0


class KernelLoadError(RuntimeError):
    """A kernel could not be loaded; `reason` is one CamelCase word. The seed stays dormant."""

    def __init__(self, reason: str, message: str, bundle: str | os.PathLike[str] = "") -> None:
        self.reason = reason
        self.message = message
        self.bundle = str(bundle)
        where = f" ({self.bundle})" if self.bundle else ""
        super().__init__(f"{reason}: {message}{where}")


class KernelShapeError(KernelLoadError, ValueError):
    """A tensor does not match what a kernel was compiled for (shape, dtype, device, layout, count).

    Raised before the kernel runs, so nothing is read out of bounds. A KernelLoadError, so germination
    refuses such a kernel like any unloadable one; a ValueError, since it is a bad argument. `reason`:
    ShapeMismatch, DTypeMismatch, DeviceMismatch, LayoutMismatch or InputCount; `slot`: the seed slot
    the kernel is installed in (None for a kernel called directly); `key`: the kernel key.
    """

    def __init__(
        self, message: str, *, key: str = "", slot: str | None = None, reason: str = "ShapeMismatch"
    ) -> None:
        self.key = key
        self.slot = slot
        super().__init__(reason, message)

    def __str__(self) -> str:
        where = f"slot {self.slot}: " if self.slot else ""
        kernel = f"kernel {self.key[:16]}: " if self.key else ""
        return f"{self.reason}: {where}{kernel}{self.message}"


class KernelShapeWarning(RuntimeWarning):
    """A seed was left out of an evaluation call whose input did not fit its kernel (once per kernel)."""


def warmup() -> float:
    """Pay the one-off costs of the first kernel load now (import inductor, probe the CPU ISA).

    Call at trainer start-up; returns the seconds spent. Later calls are free (both are cached).
    """
    t0 = time.perf_counter()
    import torch._inductor  # noqa: F401  (the import itself is ~2 s cold)
    from torch._inductor import aoti_load_package, cpu_vec_isa  # noqa: F401
    from torch.export.pt2_archive import _package  # noqa: F401

    import esper.artifact
    import esper.targets  # noqa: F401
    from esper.aoti import no_isa_probe

    with no_isa_probe():  # loads skip the gcc probe too; the manifest's ISA is checked instead
        cpu_vec_isa.pick_vec_isa()
    return time.perf_counter() - t0


def kernel_key_of(module: nn.Module | None) -> str | None:
    """The key a kernel module carries (KernelModule, EagerKernel), or None."""
    return getattr(module, "kernel_key", None)


class EagerKernel(nn.Module):
    """A plain nn.Module used as a seed kernel: tests, and the no-compile fallback."""

    def __init__(self, module: nn.Module, key: str | None = None) -> None:
        super().__init__()
        self.module = module
        self.kernel_key = key or f"eager:{type(module).__name__}"

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.module(*inputs)


def from_module(module: nn.Module, key: str | None = None) -> nn.Module:
    """Wrap a plain module as a kernel (a module that already is a kernel is returned as is)."""
    if isinstance(module, EagerKernel | KernelModule):
        return module
    return EagerKernel(module, key)


BATCH = "batch"  # the symbolic first dim of every kernel input and output
_UNBOUNDED = 1 << 62
_STRIDED = torch.strided


class _Expect:
    """One tensor a kernel takes: its label for messages, shape (ints and dim names) and dtype.

    `tail` is set when the shape is `[batch, int, ...]` (every kernel today): a call then checks the
    tensor with one tuple comparison instead of a loop over dims."""

    __slots__ = ("dtype", "label", "rank", "shape", "tail")

    def __init__(self, label: str, shape: Sequence[int | str], dtype: str) -> None:
        self.label = label
        self.shape = tuple(shape)
        self.rank = len(self.shape)
        self.dtype: torch.dtype = _dtype(dtype)
        fixed = all(isinstance(d, int) for d in self.shape[1:])
        self.tail = tuple(self.shape[1:]) if self.shape[:1] == (BATCH,) and fixed else None


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise KernelLoadError("BadManifest", f"unknown dtype {name!r}")
    return dt


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _io_specs(
    what: str, names: Sequence[str], shapes: Sequence[Sequence[int | str]], dtypes: Sequence[str]
) -> list[_Expect]:
    return [
        _Expect(f"{what} {i} ({n})" if n else f"{what} {i}", shape, dt)
        for i, (n, shape, dt) in enumerate(zip(names, shapes, dtypes, strict=True))
    ]


def _first_order(backward: Any) -> Any:
    """`once_differentiable` without its cost in the usual backward. There grad mode is already off
    (no `create_graph`), and the stock wrapper's `no_grad` block costs about 5 µs a training step;
    under `create_graph` it runs as is, so differentiating a kernel's gradients again raises."""
    guarded = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def run(ctx: Any, *grad_outputs: Any) -> Any:
        return guarded(ctx, *grad_outputs) if torch.is_grad_enabled() else backward(ctx, *grad_outputs)

    return run


class _CompiledFunction(torch.autograd.Function):
    """Forward package in forward; backward package in backward (grads for inputs and params).

    `flat` arrives checked (KernelModule.forward); the grad outputs are checked here, against the
    manifest's outputs with the batch of the forward call."""

    @staticmethod
    def forward(ctx: Any, kernel: KernelModule, bound: dict[str, int], *flat: torch.Tensor) -> Any:
        n = kernel.n_inputs
        inputs, params = flat[:n], flat[n:]
        outs = _as_tuple(kernel.forward_runner(*inputs, params))
        ctx.kernel = kernel
        ctx.bound = bound
        ctx.out_meta = [(o.shape, o.dtype, o.device) for o in outs]
        ctx.save_for_backward(*inputs, *params)
        return outs[0] if len(outs) == 1 else outs

    @staticmethod
    @_first_order
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> Any:
        kernel: KernelModule = ctx.kernel
        saved = ctx.saved_tensors
        inputs, params = saved[: kernel.n_inputs], tuple(saved[kernel.n_inputs :])
        gs = [
            torch.zeros(shape, dtype=dtype, device=device) if g is None else g
            for g, (shape, dtype, device) in zip(grad_outputs, ctx.out_meta, strict=True)
        ]
        gs = kernel._match(gs, kernel._out_expects, dict(ctx.bound))
        grads = _as_tuple(kernel.backward_runner(*inputs, *gs, params))
        return (None, None, *grads)


class _TrainingFunction(torch.autograd.Function):
    """Training forward package in forward (outputs and activations, saved); training backward
    package in backward, on the saved tensors. Grad outputs are checked like `_CompiledFunction`'s."""

    @staticmethod
    def forward(ctx: Any, kernel: KernelModule, bound: dict[str, int], *flat: torch.Tensor) -> Any:
        n, n_out = kernel.n_inputs, kernel.n_outputs
        inputs, params = flat[:n], flat[n:]
        res = kernel.train_forward_runner(*inputs, params)
        outs, acts = res[:n_out], res[n_out:]
        ctx.kernel = kernel
        ctx.bound = bound
        ctx.out_meta = [(o.shape, o.dtype, o.device) for o in outs]
        ctx.save_for_backward(*gather_saved(kernel.saved, inputs, outs, acts), *params)
        return outs[0] if n_out == 1 else tuple(outs)

    @staticmethod
    @_first_order
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> Any:
        kernel: KernelModule = ctx.kernel
        saved = ctx.saved_tensors
        n_saved = len(kernel.saved)
        gs = [
            torch.zeros(shape, dtype=dtype, device=device) if g is None else g
            for g, (shape, dtype, device) in zip(grad_outputs, ctx.out_meta, strict=True)
        ]
        gs = kernel._match(gs, kernel._out_expects, dict(ctx.bound))
        grads = kernel.backward_runner(*saved[:n_saved], *gs, tuple(saved[n_saved:]))
        return (None, None, *grads)


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, tuple | list) else (out,)


class KernelModule(nn.Module):
    """A loaded compiled kernel. Parameters: `params.0`, `params.1`, ... in manifest order.

    `dim_bounds` gives (min, max) of each named dim; `batch` is 1..`max_batch`, a name without
    bounds is 1..unbounded. `slot_name` is set by the seed slot that holds the kernel (for messages).
    With `train_forward_runner` (format v2), `backward_runner` is the training backward and takes
    `saved` (the manifest's list) first; without it, the backward recomputes the forward (format v1).
    """

    def __init__(
        self,
        forward_runner: Any,
        backward_runner: Any,
        params: Sequence[tuple[str, torch.Tensor]],
        *,
        key: str,
        n_inputs: int = 1,
        input_shapes: Sequence[Sequence[int | str]] = (),
        output_shapes: Sequence[Sequence[int | str]] = (),
        input_dtypes: Sequence[str] = (),
        output_dtypes: Sequence[str] = (),
        input_names: Sequence[str] = (),
        output_names: Sequence[str] = (),
        max_batch: int | None = None,
        dim_bounds: Mapping[str, tuple[int, int]] | None = None,
        target: str = "cpu",
        device: str | torch.device | None = None,
        load_seconds: float = 0.0,
        train_forward_runner: Any = None,
        saved: Sequence[Any] = (),
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # Manifest facts the runtime does not need per call: graph, blueprint, mixesPositions, causal
        # (read by esper.kasmina.causality and esper.kasmina.export).
        self.meta: dict[str, Any] = dict(meta or {})
        self.forward_runner = forward_runner
        self.backward_runner = backward_runner
        self.train_forward_runner = train_forward_runner
        self.saved = list(saved)
        self.param_names = [n for n, _ in params]
        self.params = nn.ParameterList([nn.Parameter(t) for _, t in params])
        self.kernel_key = key
        self.n_inputs = n_inputs
        self.input_shapes = [list(s) for s in input_shapes]
        self.output_shapes = [list(s) for s in output_shapes]
        self.max_batch = max_batch
        self.target = target
        self.load_seconds = load_seconds
        self.slot_name: str | None = None
        if device is None:
            device = params[0][1].device if params else torch.device(target.split("-", 1)[0])
        self.device = torch.device(device)
        self.dim_bounds = {BATCH: (1, max_batch or _UNBOUNDED), **(dim_bounds or {})}
        self._max_batch = self.dim_bounds[BATCH][1]
        n_out = len(self.output_shapes)
        self.n_outputs = n_out
        self._in_expects = _io_specs(
            "input",
            list(input_names) or [""] * len(self.input_shapes),
            self.input_shapes,
            list(input_dtypes) or ["float32"] * len(self.input_shapes),
        )
        self._out_expects = _io_specs(
            "grad output",
            list(output_names) or [""] * n_out,
            self.output_shapes,
            list(output_dtypes) or ["float32"] * n_out,
        )
        self._param_meta = [(tuple(t.shape), t.dtype) for _, t in params]
        self._params_checked = True  # as loaded; `_apply` and `_load_from_state_dict` clear it
        from esper.kasmina.custom_op import register

        self.op_handle = register(self)  # names the kernel inside torch.compile graphs

    def __deepcopy__(self, memo: dict[int, Any]) -> KernelModule:
        """A copy with its own parameters that shares the loaded packages (native code: stateless
        between calls, and not copyable), e.g. for an EMA copy of a grown model or an export."""
        import copy

        from esper.kasmina.custom_op import register

        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            shared = k.endswith("_runner")  # forward, backward and (format v2) training forward
            new.__dict__[k] = v if shared else copy.deepcopy(v, memo)
        new.op_handle = register(new)
        return new

    def forward(self, *inputs: torch.Tensor) -> Any:
        if torch.compiler.is_compiling():  # traced by torch.compile: one custom op, no graph break
            from esper.kasmina.custom_op import compiled_call

            return compiled_call(self, inputs)
        if len(inputs) != self.n_inputs:
            raise self._error(f"takes {self.n_inputs} input(s), got {len(inputs)}", "InputCount")
        bound: dict[str, int] = {}
        if self._in_expects:
            inputs = tuple(self._match(inputs, self._in_expects, bound))
        if not self._params_checked:
            self._check_params()
        # The ParameterList's own dict, not `*self.params`: iterating a ParameterList costs ~2.5 µs a
        # parameter (an attribute lookup per item), more than the whole guard.
        params = self._modules["params"]._parameters.values()  # type: ignore[union-attr]
        if self.train_forward_runner is None:
            return _CompiledFunction.apply(self, bound, *inputs, *params)
        if torch.is_grad_enabled() and (
            any(x.requires_grad for x in inputs) or any(p.requires_grad for p in params)  # type: ignore[union-attr]
        ):
            return _TrainingFunction.apply(self, bound, *inputs, *params)
        return self.forward_runner(*inputs, tuple(params))

    # ---- the guard -------------------------------------------------------------------------------

    def _match(
        self, tensors: Sequence[Any], expects: Sequence[_Expect], bound: dict[str, int]
    ) -> list[torch.Tensor]:
        """`tensors`, checked against `expects` (raises KernelShapeError) and made contiguous; binds
        the named dims (batch, ...) in `bound`, so every tensor of a call agrees on them."""
        dev, maxb = self.device, self._max_batch
        out = []
        for x, e in zip(tensors, expects, strict=True):
            tail = e.tail
            if (
                tail is not None
                and isinstance(x, torch.Tensor)
                and x.dim() == e.rank
                and x.shape[1:] == tail
                and 1 <= (b := x.shape[0]) <= maxb
                and bound.get(BATCH, b) == b
                and x.dtype is e.dtype
                and x.device == dev
                and x.layout is _STRIDED
            ):
                bound[BATCH] = b
            else:
                self._explain(x, e, bound)  # raises, or binds named dims of a general shape
            out.append(x if x.is_contiguous() else x.contiguous())
        return out

    def _explain(self, x: Any, e: _Expect, bound: dict[str, int]) -> None:
        """The slow path of `_match`: check every property in turn and raise naming the first that
        fails, with the tensor's and the kernel's shape and dtype; or bind the named dims."""
        want = f"{self.describe(e.shape)} {_dtype_name(e.dtype)} on {self.device}"
        if not isinstance(x, torch.Tensor):
            raise self._error(f"{e.label} is a {type(x).__name__}; the kernel takes {want}", "ShapeMismatch")
        got = f"{tuple(x.shape)} {_dtype_name(x.dtype)} on {x.device}"

        def fail(reason: str, why: str) -> KernelShapeError:
            return self._error(f"{e.label} is {got}, the kernel takes {want}: {why}", reason)

        if x.layout is not _STRIDED:
            raise fail("LayoutMismatch", f"{x.layout} tensors are not accepted (only strided ones)")
        if x.device != self.device:
            raise fail("DeviceMismatch", f"the tensor is on {x.device}, the kernel runs on {self.device}")
        if x.dtype is not e.dtype:
            raise fail("DTypeMismatch", f"dtype {_dtype_name(x.dtype)}, not {_dtype_name(e.dtype)}")
        if x.dim() != e.rank:
            raise fail("ShapeMismatch", f"{x.dim()} dims, not {e.rank}")
        new: dict[str, int] = {}
        for i, (n, d) in enumerate(zip(x.shape, e.shape, strict=True)):
            if isinstance(d, int):
                if n != d:
                    raise fail("ShapeMismatch", f"dim {i} is {n}, not {d}")
                continue
            lo, hi = self.dim_bounds.get(d, (1, _UNBOUNDED))
            if not lo <= n <= hi:
                limit = " (the kernel's compiled maxBatch)" if d == BATCH and hi == self.max_batch else ""
                raise fail("ShapeMismatch", f"dim {i} ({d}) is {n}, outside {lo}..{hi}{limit}")
            have = bound.get(d, new.get(d))
            if have is not None and have != n:
                raise fail("ShapeMismatch", f"dim {i} ({d}) is {n}, but {d} is {have} elsewhere in this call")
            new[d] = n
        bound.update(new)

    def describe(self, shape: Sequence[int | str]) -> str:
        """A manifest shape for messages: `(batch 1..64, 16)`."""
        dims = []
        for d in shape:
            if isinstance(d, int):
                dims.append(str(d))
            else:
                lo, hi = self.dim_bounds.get(d, (1, _UNBOUNDED))
                dims.append(f"{d} {lo}..{hi}" if hi < _UNBOUNDED else f"{d} >={lo}")
        return f"({', '.join(dims)})"

    def _error(self, message: str, reason: str) -> KernelShapeError:
        return KernelShapeError(message, key=self.kernel_key, slot=self.slot_name, reason=reason)

    def _check_params(self) -> None:
        """Parameters still have their manifest shape and dtype, on the kernel's device (after a
        `.to()`, `.half()` or `load_state_dict(assign=True)`); non-contiguous ones are re-laid out."""
        for name, p, (shape, dtype) in zip(self.param_names, self.params, self._param_meta, strict=True):
            got = f"{tuple(p.shape)} {_dtype_name(p.dtype)} on {p.device}"
            want = f"{shape} {_dtype_name(dtype)} on {self.device}"
            msg = f"parameter {name} is {got}, the kernel takes {want}"
            if p.device != self.device:
                raise self._error(
                    f"{msg} (move the model back, or load the kernel for that device)", "DeviceMismatch"
                )
            if p.dtype is not dtype:
                raise self._error(f"{msg} (a compiled kernel cannot change dtype)", "DTypeMismatch")
            if tuple(p.shape) != shape:
                raise self._error(msg, "ShapeMismatch")
            if not p.is_contiguous():
                with torch.no_grad():
                    p.data = p.data.contiguous()
        self._params_checked = True

    def _apply(self, fn: Any, recurse: bool = True) -> KernelModule:
        self._params_checked = False  # `.to()`, `.half()`, `.cuda()`: checked at the next call
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._params_checked = False  # `assign=True` replaces the parameters
        super()._load_from_state_dict(*args, **kwargs)

    def fits(
        self,
        sample_shape: Sequence[int],
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
    ) -> str | None:
        """Why this kernel cannot take and return per-sample shape `sample_shape` (and `dtype`, on
        `device`, where given) as a seed's one input and output (None if it can)."""
        if not self._in_expects or not self._out_expects:
            return None  # a kernel built without its manifest's shapes: nothing to check against
        if self.n_inputs != 1 or len(self.output_shapes) != 1:
            return f"a seed takes one input and returns one output; the kernel has {self.n_inputs} and " \
                   f"{len(self.output_shapes)}"  # fmt: skip
        want_dt = None if dtype is None else _dtype(str(dtype))
        for kind, e in [("input", self._in_expects[0]), ("output", self._out_expects[0])]:
            if not self._fits_shape(e.shape, sample_shape):
                dims = ", ".join(map(str, sample_shape))
                return f"kernel {kind} shape {self.describe(e.shape)} does not fit activation (batch, {dims})"
            if want_dt is not None and want_dt is not e.dtype:
                got = _dtype_name(want_dt)
                return f"kernel {kind} dtype {_dtype_name(e.dtype)} is not the activation's {got}"
        if device is not None and torch.device(device) != self.device:
            return f"kernel runs on {self.device}, the activation is on {device}"
        return None

    def _fits_shape(self, shape: Sequence[int | str], sample_shape: Sequence[int]) -> bool:
        if len(shape) != len(sample_shape) + 1 or shape[0] != BATCH:
            return False
        for d, n in zip(shape[1:], sample_shape, strict=True):
            if isinstance(d, int):
                if d != n:
                    return False
            elif not self._within(d, n):
                return False
        return True

    def _within(self, name: str, n: int) -> bool:
        lo, hi = self.dim_bounds.get(name, (1, _UNBOUNDED))
        return lo <= n <= hi

    def extra_repr(self) -> str:
        return f"key={self.kernel_key[:16]}, target={self.target}, params={len(self.param_names)}"


def _torch_minor(version: str) -> str:
    return ".".join(version.split("+", 1)[0].split(".")[:2])


def _check_manifest(manifest: Manifest, device: torch.device, bundle: Path) -> None:
    from esper.devices import check_runtime
    from esper.targets import Target

    missing = [f for f in manifest.data_files if f not in manifest.files]
    if missing:
        raise KernelLoadError("IncompleteBundle", f"manifest lists no {', '.join(missing)}", bundle)
    target = Target.parse(manifest.target)
    if target.device != device.type:
        raise KernelLoadError(
            "DeviceMismatch", f"kernel is for target {target.name}, the seed runs on {device}", bundle
        )
    if manifest.toolchain.capability != target.capability:
        raise KernelLoadError(
            "ToolchainMismatch",
            f"capability {manifest.toolchain.capability} is not target {target.name}'s {target.capability}",
            bundle,
        )
    why = check_runtime(target)
    if why is not None:
        raise KernelLoadError("UnsupportedTarget", why, bundle)
    if _torch_minor(manifest.toolchain.torch) != _torch_minor(torch.__version__):
        raise KernelLoadError(
            "ToolchainMismatch",
            f"kernel built with torch {manifest.toolchain.torch}, this process runs {torch.__version__}",
            bundle,
        )


def _load_params(manifest: Manifest, bundle: Path, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """Parameters in manifest order (safetensors files do not keep order), checked name/shape/dtype."""
    from safetensors.torch import load_file

    from esper.artifact import PARAMS

    try:
        tensors = load_file(str(bundle / PARAMS), device=str(device))
    except Exception as e:
        raise KernelLoadError("BadParams", f"{PARAMS}: {e}", bundle) from e
    want = {p.name for p in manifest.params}
    if set(tensors) != want:
        diff = sorted(set(tensors) ^ want)
        raise KernelLoadError("BadParams", f"{PARAMS} and the manifest disagree on {diff[:5]}", bundle)
    out = []
    for p in manifest.params:
        t = tensors[p.name]
        if list(t.shape) != list(p.shape) or str(t.dtype).removeprefix("torch.") != p.dtype:
            msg = f"param {p.name}: file has {list(t.shape)} {t.dtype}, manifest {p.shape} {p.dtype}"
            raise KernelLoadError("BadParams", msg, bundle)
        out.append((p.name, t))
    return out


def load_kernel(
    bundle_dir: str | os.PathLike[str],
    expected_sha256: str | None = None,
    device: str | torch.device = "cpu",
    *,
    sample_shape: Sequence[int] | None = None,
    sample_dtype: str | torch.dtype | None = None,
    metrics: KasminaMetrics | None = None,
    trusted_keys: TrustedKeys | Sequence[str | os.PathLike[str]] | None = None,
) -> KernelModule:
    """Verify a bundle, check it fits this device (and `sample_shape`, the per-sample activation
    shape, and `sample_dtype`, if given), then load both packages. Any failure is a KernelLoadError
    naming the reason.

    Verification comes first: nothing from the bundle is loaded (the .pt2 files are native code)
    before its manifest's signature holds for a trusted key (`trusted_keys`, else $ESPER_TRUSTED_KEYS,
    else the local key pair: esper.signing), the manifest's sha256 matches `expected_sha256` and every
    file's sha256 matches the manifest. The checks and the load run on a private copy, so a file
    swapped in `bundle_dir` meanwhile is never loaded.
    """
    with tempfile.TemporaryDirectory(prefix="esper-kernel-") as private:
        return _load_kernel(
            Path(bundle_dir),
            Path(private) / "bundle",
            expected_sha256,
            torch.device(device),
            sample_shape=sample_shape,
            sample_dtype=sample_dtype,
            metrics=metrics,
            trusted_keys=trusted_keys,
        )


def _load_kernel(
    bundle: Path,
    copy: Path,
    expected_sha256: str | None,
    dev: torch.device,
    *,
    sample_shape: Sequence[int] | None,
    sample_dtype: str | torch.dtype | None,
    metrics: KasminaMetrics | None,
    trusted_keys: TrustedKeys | Sequence[str | os.PathLike[str]] | None,
) -> KernelModule:
    global _loads_in_process
    from esper.artifact import (
        BACKWARD,
        FORMAT_V1,
        FORWARD,
        TRAIN_BACKWARD,
        TRAIN_FORWARD,
        ArtifactError,
        private_copy,
    )
    from esper.signing import KeyFileError, SignatureError, resolve_trusted

    m = metrics or default_metrics()
    t0 = time.perf_counter()
    try:
        try:
            trusted = resolve_trusted(trusted_keys)
            manifest = private_copy(bundle, copy, expected_sha256, trusted=trusted)
        except (SignatureError, KeyFileError) as e:
            raise KernelLoadError("SignatureRefused", str(e), bundle) from e
        except ArtifactError as e:
            raise KernelLoadError("VerificationFailed", str(e), bundle) from e
        _check_manifest(manifest, dev, bundle)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())  # the guard compares devices exactly
        if not manifest.inputs or not manifest.outputs:
            raise KernelLoadError("BadManifest", "manifest lists no inputs or outputs", bundle)
        kernel_args: dict[str, Any] = dict(
            key=manifest.key,
            n_inputs=len(manifest.inputs),
            input_shapes=[i.shape for i in manifest.inputs],
            output_shapes=[o.shape for o in manifest.outputs],
            input_dtypes=[i.dtype for i in manifest.inputs],
            output_dtypes=[o.dtype for o in manifest.outputs],
            input_names=[i.name for i in manifest.inputs],
            output_names=[o.name for o in manifest.outputs],
            max_batch=manifest.options.maxBatch,
            target=manifest.target,
            device=dev,
            meta={"graph": manifest.graph, "blueprint": manifest.blueprint, "params": manifest.param_names(),
                  "mixesPositions": manifest.mixesPositions, "causal": manifest.causal},
        )  # fmt: skip
        if sample_shape is not None:
            probe = KernelModule(None, None, [], **kernel_args)
            why = probe.fits(sample_shape, sample_dtype)
            if why is not None:
                raise KernelLoadError("ShapeMismatch", why, bundle)
        params = _load_params(manifest, copy, dev)
        from esper.aoti import load_package

        v1 = manifest.format == FORMAT_V1
        runners = []
        for name in (FORWARD, BACKWARD) if v1 else (FORWARD, TRAIN_BACKWARD, TRAIN_FORWARD):
            try:
                index = dev.index if dev.type == "cuda" else None
                runners.append(load_package(copy / name, device_index=index))
            except Exception as e:
                raise KernelLoadError("PackageLoadFailed", f"{name}: {e}", bundle) from e
    except KernelLoadError as e:
        m.kernel_load_failures.labels(reason=e.reason).inc()
        log.warning("kernel load refused: %s", e)
        raise
    seconds = time.perf_counter() - t0
    m.kernel_load_seconds.observe(seconds)
    _loads_in_process += 1
    log.info(
        "loaded kernel %s in %.3fs (load %d in this process)", manifest.key[:16], seconds, _loads_in_process
    )
    if not v1:
        kernel_args.update(train_forward_runner=runners[2], saved=manifest.saved)
    return KernelModule(runners[0], runners[1], params, load_seconds=seconds, **kernel_args)
