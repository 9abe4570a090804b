"""Compile a seed module into a kernel bundle: AOTInductor packages for forward AND backward.

Why this road (see docs/compile-road.md): a hot-loaded seed must train without a compile stall in the
trainer, and nothing loaded may be a pickle. AOTInductor packages are native code plus JSON, load in
milliseconds and never trace at run time. Parameters are *inputs* of both programs, so the trainer owns
them as ordinary nn.Parameters and the optimizer updates them in place.

The backward program is traced from a joint function that recomputes the forward and calls
`torch.autograd.grad` (like activation checkpointing): no activations cross the boundary between the two
packages, at the cost of running the forward twice per training step.

Limitations: stochastic/stateful ops are compiled with eval semantics (dropout is the identity, batch
norm uses its running statistics, which are baked into the package as constants); only the batch
dimension is dynamic (1..maxBatch).
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esper.artifact import BACKWARD, FORWARD, PARAMS, ParamSpec
from esper.contracts.common import CompileOptions, Toolchain
from esper.devices import check_runtime
from esper.targets import Target
from esper.tezzeret.exitcodes import InvalidBlueprint, UnsupportedTarget

if TYPE_CHECKING:
    import torch
    from torch import nn

    from esper.blueprint.ir import Graph

log = logging.getLogger("esper.tezzeret")

# x86-64-v3 = AVX2 + FMA + F16C (+ BMI, MOVBE): what "cpu-avx2" promises to every node that loads it.
CPU_MARCH = "x86-64-v3"
CPU_ISA = "avx2"
# Members of an AOTInductor package we accept; anything else (a pickle above all) fails the compile.
_PACKAGE_SUFFIXES = (".so", ".cpp", ".h", ".json", ".cubin")
_PACKAGE_NAMES = frozenset({"archive_format", "archive_version", "version", "byteorder", "serialization_id"})


@dataclass(frozen=True)
class InputSpec:
    """One graph input: its per-sample shape (the batch dim excluded) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass
class CompileResult:
    """What `compile_module` built: the bundle's data files, the eager reference, timings."""

    bundle_dir: Path
    forward_path: Path
    backward_path: Path
    params_path: Path
    module: nn.Module
    params: list[torch.Tensor]
    param_specs: list[ParamSpec]
    input_specs: list[InputSpec]
    output_shapes: list[tuple[int, ...]]
    target: Target
    toolchain: Toolchain
    isa: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_outputs(self) -> int:
        return len(self.output_shapes)

    @property
    def compile_seconds(self) -> float:
        return sum(self.timings.values())


def torch_version() -> str:
    """torch's release without the local build tag ("2.13.0+cpu" -> "2.13.0"): what the key records."""
    import torch

    return torch.__version__.split("+", 1)[0]


def toolchain_for(target: Target) -> Toolchain:
    """The toolchain this process compiles `target` with; part of the kernel key."""
    return Toolchain(torch=torch_version(), capability=target.capability, python=platform.python_version())


def input_specs_of(graph: Graph) -> list[InputSpec]:
    """Input specs of an IR graph: shape without the leading symbolic batch."""
    specs = []
    for t in graph.inputs:
        dims = list(t.shape[1:])
        if t.shape[0] != "batch" or any(not isinstance(d, int) for d in dims):
            raise InvalidBlueprint(f"input {t.name}: only the first dimension may be 'batch' (got {t.shape})")
        specs.append(InputSpec(t.name, tuple(int(d) for d in dims), graph.dtype))
    return specs


def resolve_device(target: Target) -> torch.device:
    """The device to compile on; a target this machine cannot serve is permanent (exit 66)."""
    import torch

    why = check_runtime(target)
    if why is not None:
        raise UnsupportedTarget(why)
    return torch.device("cuda" if target.kind == "cuda" else "cpu")


@contextlib.contextmanager
def inductor_settings(target: Target) -> Iterator[None]:
    """Pin CPU code to AVX2/x86-64-v3 instead of inductor's default `-march=native`.

    simdlen=256 makes inductor emit AVX2 vector code; march keeps gcc from using AVX-512 in the
    rest (the default -march=native would, on a build node that has it, and crash elsewhere).
    vec_isa_ok skips inductor's gcc probe of every ISA (seconds per process); AVX2 is checked by
    `check_runtime` instead.
    """
    from torch._inductor import config

    patch: dict[str, Any] = {}
    if target.kind == "cpu":
        patch = {"cpp.simdlen": 256, "cpp.march": CPU_MARCH, "cpp.vec_isa_ok": True}
    with config.patch(patch):
        yield


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _unregistered(module: nn.Module) -> Callable[..., Any]:
    """Hide the module from export's attribute walk so its parameters are not baked as constants."""
    from torch.func import functional_call

    return lambda state, inputs: functional_call(module, state, inputs)


class _Buffers:
    """The module's buffers (batch-norm running stats...): constants of both programs, in eval semantics.

    They are registered on the exported wrappers, so export bakes them into the package as constants,
    and passed to the module explicitly, so the symbolic tracer never meets a real tensor.
    """

    def __init__(self, module: nn.Module) -> None:
        named = list(module.named_buffers())
        self.names = [n for n, _ in named]
        self.values = [b.detach() for _, b in named]

    def register(self, owner: nn.Module) -> None:
        for i, b in enumerate(self.values):
            owner.register_buffer(f"buffer{i}", b)

    def of(self, owner: nn.Module) -> list[torch.Tensor]:
        return [getattr(owner, f"buffer{i}") for i in range(len(self.values))]


def _forward_program(module: nn.Module, names: Sequence[str], n_inputs: int) -> nn.Module:
    """`forward(*inputs, params: tuple) -> outputs`, calling the module with the given params."""
    from torch import nn

    call, buffers = _unregistered(module), _Buffers(module)
    state_names = [*names, *buffers.names]

    class Forward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            buffers.register(self)

        def forward(self, *args: Any) -> Any:
            inputs, params = args[:n_inputs], args[n_inputs]
            state = dict(zip(state_names, [*params, *buffers.of(self)], strict=True))
            return call(state, tuple(inputs))

    return Forward()


def _joint(module: nn.Module, names: Sequence[str], n_inputs: int, n_outputs: int) -> Callable[..., Any]:
    """`(inputs..., grad_outputs..., params..., buffers...) -> (grad_inputs..., grad_params...)`.

    Recomputes the forward (the two packages share no saved activations) and differentiates it.
    """
    import torch

    call, buffers = _unregistered(module), _Buffers(module)
    n_params, n_head = len(names), n_inputs + n_outputs
    state_names = [*names, *buffers.names]

    def joint(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        xs = [x.detach().requires_grad_(True) for x in flat[:n_inputs]]
        gs = flat[n_inputs:n_head]
        ps = [p.detach().requires_grad_(True) for p in flat[n_head : n_head + n_params]]
        bs = list(flat[n_head + n_params :])
        with torch.enable_grad():
            outs = _as_tuple(call(dict(zip(state_names, [*ps, *bs], strict=True)), tuple(xs)))
            grads = torch.autograd.grad(outs, [*xs, *ps], list(gs), allow_unused=True, materialize_grads=True)
        return tuple(grads)

    return joint


def _backward_program(gm: nn.Module, module: nn.Module, n_inputs: int, n_outputs: int) -> nn.Module:
    from torch import nn

    buffers = _Buffers(module)

    class Backward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gm = gm
            buffers.register(self)

        def forward(self, *args: Any) -> tuple[torch.Tensor, ...]:
            head, params = args[: n_inputs + n_outputs], args[n_inputs + n_outputs]
            return tuple(self.gm(*head, *params, *buffers.of(self)))

    return Backward()


def _check_package(path: Path) -> None:
    """A bundle must hold no pickle: refuse a package with members we do not expect."""
    with zipfile.ZipFile(path) as zf:
        bad = [
            n
            for n in zf.namelist()
            if not n.endswith(("/", *_PACKAGE_SUFFIXES)) and n.rsplit("/", 1)[-1] not in _PACKAGE_NAMES
        ]
    if bad:
        raise RuntimeError(f"{path.name} holds unexpected members (pickle?): {', '.join(bad[:5])}")


def sample_inputs(
    specs: Sequence[InputSpec], batch: int, device: torch.device, seed: int = 0
) -> list[torch.Tensor]:
    """Deterministic normal inputs of a given batch (on CPU first, so every device sees the same data)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn((batch, *s.shape), generator=gen, dtype=torch.float32).to(
            device=device, dtype=getattr(torch, s.dtype)
        )
        for s in specs
    ]


def compile_module(
    module: nn.Module,
    input_specs: Sequence[InputSpec],
    target: Target | str,
    options: CompileOptions,
    workdir: Path,
) -> CompileResult:
    """Export and AOT-compile `module`'s forward and backward into `workdir/bundle`; write its params.

    The module is put in eval mode (see the module docstring). Raises UnsupportedTarget (66) when this
    machine cannot compile for `target`.
    """
    import torch
    from safetensors.torch import save_file
    from torch._inductor import aoti_compile_and_package
    from torch.export import Dim, export
    from torch.fx.experimental.proxy_tensor import make_fx

    target = Target.parse(target)
    device = resolve_device(target)
    timings: dict[str, float] = {}
    bundle = Path(workdir) / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    module = module.to(device).eval()
    named = list(module.named_parameters())
    names = [n for n, _ in named]
    params = [p.detach() for _, p in named]
    n_in = len(input_specs)
    # Batch 1 would let the tracer specialize the batch to a constant; trace at 2..4 instead.
    trace_batch = min(4, options.maxBatch)
    xs = sample_inputs(input_specs, trace_batch, device, seed=options.initSeed)
    with torch.no_grad():
        outs = _as_tuple(module(*xs))
    n_out = len(outs)
    gs = [torch.ones_like(o) for o in outs]
    dynamic = options.maxBatch >= 2
    batch = Dim("batch", min=1, max=options.maxBatch) if dynamic else None
    bdim = {0: batch} if dynamic else None
    pspec = tuple(None for _ in params)
    timings["prepare"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fwd_ep = export(
        _forward_program(module, names, n_in),
        (*xs, tuple(params)),
        dynamic_shapes=((*([bdim] * n_in), pspec),),  # one entry: the *args tuple
    )
    timings["exportForward"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    buffers = _Buffers(module).values
    gm = make_fx(_joint(module, names, n_in, n_out), tracing_mode="symbolic")(*xs, *gs, *params, *buffers)
    bwd_ep = export(
        _backward_program(gm, module, n_in, n_out),
        (*xs, *gs, tuple(params)),
        dynamic_shapes=((*([bdim] * (n_in + n_out)), pspec),),
    )
    timings["exportBackward"] = time.perf_counter() - t0

    fwd_path, bwd_path = bundle / FORWARD, bundle / BACKWARD
    with inductor_settings(target):
        t0 = time.perf_counter()
        aoti_compile_and_package(fwd_ep, package_path=str(fwd_path))
        timings["aotiForward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        aoti_compile_and_package(bwd_ep, package_path=str(bwd_path))
        timings["aotiBackward"] = time.perf_counter() - t0
    _check_package(fwd_path)
    _check_package(bwd_path)

    t0 = time.perf_counter()
    params_path = bundle / PARAMS
    # clone(): tied or view parameters would make safetensors refuse shared storage.
    save_file({n: p.detach().cpu().contiguous().clone() for n, p in named}, str(params_path))
    timings["saveParams"] = time.perf_counter() - t0

    # In registration order: the order the packages take them in, and the manifest lists them.
    specs = [
        ParamSpec(name=n, shape=list(p.shape), dtype=str(p.dtype).removeprefix("torch.")) for n, p in named
    ]
    log.info(
        "compiled %d params, %d inputs, %d outputs in %.1fs", len(specs), n_in, n_out, sum(timings.values())
    )
    return CompileResult(
        bundle_dir=bundle,
        forward_path=fwd_path,
        backward_path=bwd_path,
        params_path=params_path,
        module=module,
        params=params,
        param_specs=specs,
        input_specs=list(input_specs),
        output_shapes=[tuple(o.shape[1:]) for o in outs],
        target=target,
        toolchain=toolchain_for(target),
        isa=CPU_ISA if target.kind == "cpu" else str(target.arch),
        timings=timings,
    )


def compile_graph(
    graph: Graph, target: Target | str, options: CompileOptions, workdir: Path
) -> CompileResult:
    """Build the IR graph's module (params seeded by options.initSeed) and compile it."""
    from esper.blueprint import build_module

    t0 = time.perf_counter()
    module = build_module(graph, seed=options.initSeed)
    build_s = time.perf_counter() - t0
    result = compile_module(module, input_specs_of(graph), target, options, workdir)
    result.timings = {"build": build_s, **result.timings}
    return result
