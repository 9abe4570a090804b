"""Loading compiled kernels: verify the bundle, check it fits this machine, wrap it as an nn.Module.

A `KernelModule` owns the kernel's parameters as ordinary nn.Parameters (so any optimizer trains them
and state_dict saves them) and runs the AOTInductor forward package inside a custom autograd Function
whose backward runs the backward package. The backward package recomputes the forward internally, so
only inputs and parameters are saved between the two (activation-checkpointing memory, 2x forward).

First load in a process: `aoti_load_package` probes the CPU's vector ISA by compiling tiny programs
with the C++ compiler (~2 s here), and importing torch._inductor costs ~2 s more. `warmup()` pays both
at trainer start-up so the first hot-load in the training loop takes milliseconds.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from esper.kasmina.telemetry import KasminaMetrics, default_metrics

if TYPE_CHECKING:
    from esper.artifact import Manifest

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


class _CompiledFunction(torch.autograd.Function):
    """Forward package in forward; backward package in backward (grads for inputs and params)."""

    @staticmethod
    def forward(ctx: Any, kernel: KernelModule, *flat: torch.Tensor) -> Any:
        n = kernel.n_inputs
        inputs = tuple(t.contiguous() for t in flat[:n])
        params = tuple(flat[n:])
        outs = _as_tuple(kernel.forward_runner(*inputs, params))
        ctx.kernel = kernel
        ctx.out_meta = [(o.shape, o.dtype, o.device) for o in outs]
        ctx.save_for_backward(*inputs, *params)
        return outs[0] if len(outs) == 1 else outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> Any:
        kernel: KernelModule = ctx.kernel
        saved = ctx.saved_tensors
        inputs, params = saved[: kernel.n_inputs], tuple(saved[kernel.n_inputs :])
        gs = [
            torch.zeros(shape, dtype=dtype, device=device) if g is None else g.contiguous()
            for g, (shape, dtype, device) in zip(grad_outputs, ctx.out_meta, strict=True)
        ]
        grads = _as_tuple(kernel.backward_runner(*inputs, *gs, params))
        return (None, *grads)


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, tuple | list) else (out,)


class KernelModule(nn.Module):
    """A loaded compiled kernel. Parameters: `params.0`, `params.1`, ... in manifest order."""

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
        max_batch: int | None = None,
        target: str = "cpu",
        load_seconds: float = 0.0,
    ) -> None:
        super().__init__()
        self.forward_runner = forward_runner
        self.backward_runner = backward_runner
        self.param_names = [n for n, _ in params]
        self.params = nn.ParameterList([nn.Parameter(t) for _, t in params])
        self.kernel_key = key
        self.n_inputs = n_inputs
        self.input_shapes = [list(s) for s in input_shapes]
        self.output_shapes = [list(s) for s in output_shapes]
        self.max_batch = max_batch
        self.target = target
        self.load_seconds = load_seconds

    def forward(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) != self.n_inputs:
            raise TypeError(f"kernel {self.kernel_key[:16]} takes {self.n_inputs} inputs, got {len(inputs)}")
        if self.max_batch is not None and inputs[0].shape[0] > self.max_batch:
            raise ValueError(
                f"batch {inputs[0].shape[0]} exceeds the kernel's compiled maxBatch {self.max_batch}"
            )
        return _CompiledFunction.apply(self, *inputs, *self.params)

    def fits(self, sample_shape: Sequence[int]) -> str | None:
        """Why this kernel cannot take and return per-sample shape `sample_shape` (None if it can)."""
        want = list(sample_shape)
        for kind, shapes in (("input", self.input_shapes), ("output", self.output_shapes)):
            if shapes and list(shapes[0][1:]) != want:
                dims = ", ".join(map(str, want))
                return f"kernel {kind} shape {shapes[0]} does not fit activation [batch, {dims}]"
        return None

    def extra_repr(self) -> str:
        return f"key={self.kernel_key[:16]}, target={self.target}, params={len(self.param_names)}"


def _torch_minor(version: str) -> str:
    return ".".join(version.split("+", 1)[0].split(".")[:2])


def _check_manifest(manifest: Manifest, device: torch.device, bundle: Path) -> None:
    from esper.artifact import DATA_FILES
    from esper.targets import Target, check_runtime

    missing = [f for f in DATA_FILES if f not in manifest.files]
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
    metrics: KasminaMetrics | None = None,
) -> KernelModule:
    """Verify a bundle, check it fits this device (and `sample_shape`, the per-sample activation
    shape, if given), then load both packages. Any failure is a KernelLoadError naming the reason.

    Verification comes first: nothing from the bundle is loaded (the .pt2 files are native code)
    before every file's sha256 matches a manifest whose own sha256 matches `expected_sha256`.
    """
    global _loads_in_process
    from esper.artifact import BACKWARD, FORWARD, ArtifactError, verify_bundle

    m = metrics or default_metrics()
    bundle = Path(bundle_dir)
    dev = torch.device(device)
    t0 = time.perf_counter()
    try:
        try:
            manifest = verify_bundle(bundle, expected_sha256)
        except ArtifactError as e:
            raise KernelLoadError("VerificationFailed", str(e), bundle) from e
        _check_manifest(manifest, dev, bundle)
        if not manifest.inputs or not manifest.outputs:
            raise KernelLoadError("BadManifest", "manifest lists no inputs or outputs", bundle)
        kernel_args: dict[str, Any] = dict(
            key=manifest.key,
            n_inputs=len(manifest.inputs),
            input_shapes=[i.shape for i in manifest.inputs],
            output_shapes=[o.shape for o in manifest.outputs],
            max_batch=manifest.options.maxBatch,
            target=manifest.target,
        )
        if sample_shape is not None:
            probe = KernelModule(None, None, [], **kernel_args)
            why = probe.fits(sample_shape)
            if why is not None:
                raise KernelLoadError("ShapeMismatch", why, bundle)
        params = _load_params(manifest, bundle, dev)
        from esper.aoti import load_package

        runners = []
        for name in (FORWARD, BACKWARD):
            try:
                index = (-1 if dev.index is None else dev.index) if dev.type == "cuda" else None
                runners.append(load_package(bundle / name, device_index=index))
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
    return KernelModule(runners[0], runners[1], params, load_seconds=seconds, **kernel_args)
