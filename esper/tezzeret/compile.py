"""Compile a seed module into a kernel bundle: AOTInductor packages for inference and training.

Why this road (see docs/compile-road.md): a hot-loaded seed must train without a compile stall in the
trainer, and nothing loaded may be a pickle. AOTInductor packages are native code plus JSON, load in
milliseconds and never trace at run time. Parameters are *inputs* of both programs, so the trainer owns
them as ordinary nn.Parameters and the optimizer updates them in place.

Training uses two more packages cut from one joint forward+backward graph (traced with only the
batch dim symbolic) by AOTAutograd's min-cut rematerialization partitioner: the training forward
returns its outputs and the activations the backward needs, the training backward takes them. The
partitioner saves what is expensive to recompute (matmuls, convolutions) and recomputes what is cheap
(pointwise ops), so a training step runs the forward once. The inference forward is a third package,
compiled from the module alone: it neither computes nor returns anything for a backward.

Limitations: stochastic/stateful ops are compiled with eval semantics (dropout is the identity, batch
norm uses its running statistics, which are baked into the package as constants); only the batch
dimension is dynamic (1..maxBatch).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing as mp
import os
import platform
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from esper.artifact import FORWARD, PARAMS, TRAIN_BACKWARD, TRAIN_FORWARD, ParamSpec
from esper.contracts.common import CompileOptions, Toolchain
from esper.devices import check_runtime
from esper.targets import Target
from esper.tezzeret.exitcodes import CompilerUnusable, InvalidBlueprint, UnsupportedTarget

if TYPE_CHECKING:
    import torch
    from torch import nn

    from esper.blueprint.ir import Graph

log = logging.getLogger("esper.tezzeret")

PARALLEL_ENV = "ESPER_PARALLEL_COMPILES"  # "1": the AOTInductor compiles in parallel processes
# Members of an AOTInductor package we accept; anything else (a pickle above all) fails the compile.
_PACKAGE_SUFFIXES = (".so", ".cpp", ".h", ".json", ".cubin")
_PACKAGE_NAMES = frozenset({"archive_format", "archive_version", "version", "byteorder", "serialization_id"})


@dataclass(frozen=True)
class CpuIsa:
    """What a CPU target's code may use: gcc's -march, inductor's vector width, the ISA's name."""

    march: str
    simdlen: int
    name: str


# x86-64-v3 = AVX2 + FMA + F16C (+ BMI, MOVBE): what "cpu-avx2" promises to every node that loads it;
# x86-64-v4 adds AVX-512 F, BW, CD, DQ, VL: "cpu-avx512" (no VNNI, BF16 or AMX, which not every AVX-512
# CPU has).
CPU_ISAS: dict[str, CpuIsa] = {
    "cpu-avx2": CpuIsa("x86-64-v3", 256, "avx2"),
    "cpu-avx512": CpuIsa("x86-64-v4", 512, "avx512"),
}


@dataclass(frozen=True)
class InputSpec:
    """One graph input: its per-sample shape (the batch dim excluded) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class Saved:
    """One tensor the training backward takes (see esper.artifact.SavedSpec): where it comes from,
    its shape symbolic in "batch", its dtype."""

    kind: Literal["input", "output", "activation"]
    index: int
    shape: tuple[int | str, ...]
    dtype: str

    def bytes_per_sample(self) -> float:
        """Bytes this tensor grows by per sample of the batch (0 for one whose size is fixed)."""
        import sympy

        batch = sympy.Symbol("batch")
        numel = sympy.Integer(1)
        for d in self.shape:
            numel *= d if isinstance(d, int) else sympy.sympify(d, locals={"batch": batch})
        return float(sympy.diff(numel, batch).subs(batch, 1)) * _itemsize(self.dtype)


def _itemsize(dtype: str) -> int:
    import torch

    return int(getattr(torch, dtype).itemsize)


@dataclass
class CompileResult:
    """What `compile_module` built: the bundle's data files, the eager reference, timings."""

    bundle_dir: Path
    forward_path: Path
    train_forward_path: Path
    train_backward_path: Path
    params_path: Path
    module: nn.Module
    params: list[torch.Tensor]
    param_specs: list[ParamSpec]
    input_specs: list[InputSpec]
    output_shapes: list[tuple[int, ...]]
    target: Target
    toolchain: Toolchain
    isa: str
    saved: list[Saved] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_outputs(self) -> int:
        return len(self.output_shapes)

    @property
    def compile_seconds(self) -> float:
        return sum(self.timings.values())

    @property
    def saved_bytes_per_sample(self) -> float:
        """What a training step keeps alive between forward and backward, per sample (params aside)."""
        return sum(s.bytes_per_sample() for s in self.saved)


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
    why = compiler_problem(cpp_compiler())
    if why is not None:
        raise CompilerUnusable(why)
    return torch.device("cuda" if target.kind == "cuda" else "cpu")


_CXX_FIX = "set CXX to a g++ that links a shared libstdc++, such as the system's"


def cpp_compiler() -> str:
    """The C++ compiler inductor builds package wrappers with ($CXX, else g++)."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        return str(get_cpp_compiler())
    except InvalidCxxCompiler as e:
        raise CompilerUnusable(f"{e}; {_CXX_FIX}") from None


@functools.cache
def compiler_problem(compiler: str) -> str | None:
    """Why packages `compiler` builds would crash when loaded, or None; one `-print-file-name` call.

    A compiler with no shared libstdc++ links it statically into each package's wrapper. Loaded into
    torch's process, which has its own libstdc++, the two copies' locale tables clash and the
    package's constructor crashes (SIGSEGV in std::regex, seen with a separately installed GCC):
    the compile Job would die while validating, with no result to report. Refused before compiling.
    """
    try:
        cmd = [compiler, "-print-file-name=libstdc++.so"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the C++ compiler {compiler} does not run ({e}); {_CXX_FIX}"
    found = out.stdout.strip()
    if out.returncode != 0 or not os.path.isabs(found) or not os.path.exists(found):
        return (
            f"the C++ compiler {compiler} has no shared libstdc++ (-print-file-name=libstdc++.so gives "
            f"{found or out.stderr.strip()[:200]!r}): it would link libstdc++ into each package, and such a "
            f"package crashes when torch loads it; {_CXX_FIX}"
        )
    return None


@contextlib.contextmanager
def inductor_settings(target: Target) -> Iterator[None]:
    """Pin CPU code to the target's ISA (`CPU_ISAS`) instead of inductor's default `-march=native`.

    simdlen makes inductor emit AVX2 or AVX-512 vector code; march keeps gcc to the same level in the
    rest (the default -march=native would use whatever the build node has, and crash elsewhere). The
    vector ISA itself is pinned too (`pinned_vec_isa`): on a build node with VNNI, BF16 or AMX,
    inductor would otherwise pick a richer 512-bit ISA and add its flags. vec_isa_ok skips inductor's
    gcc probe of every ISA (seconds per process); the CPU is checked by `check_runtime` instead.
    """
    from unittest import mock

    from torch._inductor import config, cpu_vec_isa

    if target.kind != "cpu":
        yield
        return
    isa = CPU_ISAS[target.capability]
    patch = {"cpp.simdlen": isa.simdlen, "cpp.march": isa.march, "cpp.vec_isa_ok": True}
    pinned = pinned_vec_isa(isa)
    with config.patch(patch), mock.patch.object(cpu_vec_isa, "valid_vec_isa_list", lambda: [pinned]):
        yield


def pinned_vec_isa(isa: CpuIsa) -> Any:
    """Inductor's vector ISA for `isa`, with exactly its own compiler flags (no probe, no extras)."""
    from torch._inductor.cpu_vec_isa import VecAVX2, VecAVX512

    base = {256: VecAVX2, 512: VecAVX512}[isa.simdlen]

    class Pinned(base):  # type: ignore[valid-type,misc]
        __hash__ = base.__hash__

        def __bool__(self) -> bool:
            return True  # the runtime CPU is checked from the kernel's target

        def build_arch_flags(self) -> str:
            return base._arch_flags  # VecAVX512 adds -mavx512bf16 where the build CPU has BF16

    return Pinned()


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


@dataclass
class _Split:
    """The joint graph cut in two: forward (primals -> outputs, saved) and backward (saved, tangents ->
    grads), with what each saved value is."""

    fw: Any  # torch.fx.GraphModule
    bw: Any
    saved: list[Saved]
    # Per backward placeholder: ("saved", i) | ("tangent", i) | ("buffer", i) | ("sym", fn(batch) -> int)
    bw_args: list[tuple[str, Any]]
    # Per training-forward output kept: index into the fw graph's outputs
    fw_keep: list[int]


def _partition(
    module: nn.Module,
    names: Sequence[str],
    xs: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor],
    dynamic: bool,
    table: dict[Any, Any],
) -> _Split:
    """Trace forward+backward as one graph (only the batch dim symbolic), decomposing `table`'s ops
    (esper.tezzeret.decompositions), and cut it with AOTAutograd's min-cut rematerialization
    partitioner."""
    import torch
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    call, buffers = _unregistered(module), _Buffers(module)
    n_in, n_par, n_out = len(xs), len(params), len(outs)
    state_names = [*names, *buffers.names]

    def joint(primals: list[torch.Tensor], tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        ins = [t.requires_grad_(True) for t in primals[:n_in]]
        ps = [t.requires_grad_(True) for t in primals[n_in : n_in + n_par]]
        bs = list(primals[n_in + n_par :])
        with torch.enable_grad():
            res = _as_tuple(call(dict(zip(state_names, [*ps, *bs], strict=True)), tuple(ins)))
            wrt = [*ins, *ps]
            grads = torch.autograd.grad(res, wrt, list(tangents), allow_unused=True, materialize_grads=True)
        return [*res, *grads]

    mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake(t: torch.Tensor, batched: bool) -> torch.Tensor:
        # DUCK: every batch dim of the same size (all of them) is one symbol
        dims = [DimDynamic.STATIC] * t.dim()
        if batched and dynamic:
            dims[0] = DimDynamic.DUCK
        return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))

    primals = [*(fake(x, True) for x in xs), *(fake(p, False) for p in [*params, *buffers.values])]
    tangents = [fake(torch.ones_like(o), True) for o in outs]
    first: Any = primals[0].shape[0] if n_in else None
    batch_sym = first.node.expr if dynamic and isinstance(first, torch.SymInt) else None
    gm = make_fx(joint, decomposition_table=table, tracing_mode="fake")(primals, tangents)
    for node in list(gm.graph.nodes):  # detach() of a primal would hide that a saved value is an input
        if node.op == "call_function" and node.target is torch.ops.aten.detach.default:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    fw, bw = min_cut_rematerialization_partition(gm, None, num_fwd_outputs=n_out)

    fw_out = list(next(n for n in fw.graph.nodes if n.op == "output").args[0])
    primal_index = {n.name: i for i, n in enumerate(p for p in fw.graph.nodes if p.op == "placeholder")}
    out_index = {n.name: i for i, n in enumerate(fw_out[:n_out]) if n is not None}
    saved: list[Saved] = []
    bw_args: list[tuple[str, Any]] = []
    fw_keep: list[int] = list(range(n_out))
    by_name = {n.name: (j, n) for j, n in enumerate(fw_out) if n is not None}
    for ph in (n for n in bw.graph.nodes if n.op == "placeholder"):
        val = ph.meta.get("val")
        if ph.name.startswith("tangents_"):
            bw_args.append(("tangent", int(ph.name.removeprefix("tangents_")) - 1))
        elif isinstance(val, torch.SymInt | int):
            bw_args.append(("sym", _batch_fn(val, batch_sym)))
        elif ph.name in primal_index and primal_index[ph.name] >= n_in + n_par:
            bw_args.append(("buffer", primal_index[ph.name] - n_in - n_par))
        elif ph.name in primal_index and primal_index[ph.name] >= n_in:
            bw_args.append(("param", primal_index[ph.name] - n_in))
        else:
            kind: Literal["input", "output", "activation"]
            if ph.name in primal_index:
                kind, index = "input", primal_index[ph.name]
            elif ph.name in out_index:
                kind, index = "output", out_index[ph.name]
            else:
                kind, index = "activation", len(fw_keep) - n_out
                fw_keep.append(by_name[ph.name][0])
            shape = tuple(_dim_name(d, batch_sym) for d in val.shape)
            saved.append(Saved(kind, index, shape, str(val.dtype).removeprefix("torch.")))
            bw_args.append(("saved", len(saved) - 1))
    return _Split(fw, bw, saved, bw_args, fw_keep)


def _dim_name(d: Any, batch_sym: Any) -> int | str:
    """A saved tensor's dim for the manifest: an int, or an expression in "batch" ("batch", "16*batch")."""
    import sympy

    if isinstance(d, int):
        return d
    expr = d.node.expr
    if expr.is_number:
        return int(expr)
    if batch_sym is None or expr.free_symbols != {batch_sym}:
        raise RuntimeError(f"a saved activation has a dim {expr} that is not a function of the batch")
    return str(expr.subs(batch_sym, sympy.Symbol("batch")))


def _batch_fn(val: Any, batch_sym: Any) -> Callable[[Any], Any]:
    """A size the backward takes as an argument, as a function of the batch (export traces it)."""
    import sympy

    expr = sympy.Integer(val) if isinstance(val, int) else val.node.expr
    if expr.is_number:
        value = int(expr)

        def constant(_batch: Any) -> int:
            return value

        return constant
    if batch_sym is None or expr.free_symbols != {batch_sym}:
        raise RuntimeError(f"the backward takes a size {expr} that is not a function of the batch")
    return sympy.lambdify([batch_sym], expr, modules=[{}])


def _train_forward_program(split: _Split, module: nn.Module, n_inputs: int) -> nn.Module:
    """`forward(*inputs, params: tuple) -> (outputs..., activations...)`."""
    from torch import nn

    buffers = _Buffers(module)
    keep = split.fw_keep

    class TrainForward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gm = split.fw
            buffers.register(self)

        def forward(self, *args: Any) -> tuple[torch.Tensor, ...]:
            inputs, params = args[:n_inputs], args[n_inputs]
            res = self.gm(*inputs, *params, *buffers.of(self))
            return tuple(res[j] for j in keep)

    return TrainForward()


def _train_backward_program(split: _Split, module: nn.Module, n_saved: int, n_outputs: int) -> nn.Module:
    """`forward(*saved, *grad_outputs, params: tuple) -> (grad_inputs..., grad_params...)`."""
    from torch import nn

    buffers = _Buffers(module)
    bw_args = split.bw_args

    class TrainBackward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gm = split.bw
            buffers.register(self)

        def forward(self, *args: Any) -> tuple[torch.Tensor, ...]:
            saved, tangents = args[:n_saved], args[n_saved : n_saved + n_outputs]
            params, bufs = args[n_saved + n_outputs], buffers.of(self)
            batch = tangents[0].shape[0]
            pick = {"saved": saved, "tangent": tangents, "param": params, "buffer": bufs}
            flat = [v(batch) if k == "sym" else pick[k][v] for k, v in bw_args]
            return tuple(self.gm(*flat))

    return TrainBackward()


def _parallel_compiles() -> bool:
    return os.environ.get(PARALLEL_ENV, "0").strip().lower() in ("1", "true", "yes")


def _aoti_one(ep: Any, path: str, target: Target) -> float:
    """One AOTInductor compile (in a forked child or in this process); its seconds."""
    from torch._inductor import aoti_compile_and_package

    t0 = time.perf_counter()
    with inductor_settings(target):
        aoti_compile_and_package(ep, package_path=path)
    return time.perf_counter() - t0


def _aoti_compile(
    jobs: Sequence[tuple[str, Any, Path]], target: Target, *, parallel: bool
) -> dict[str, float]:
    """AOT-compile each (timing key, exported program, package path); seconds per compile.

    In parallel, each compile runs in a forked process: it inherits the exported program (nothing to
    serialize) and inductor's imports (nothing to re-import), and most of a compile is single-threaded
    (Python code generation, then one C++ compiler run), so the compiles overlap on a multi-core node.
    A forked child runs torch with one thread (OpenMP is not fork-safe); a compile uses few torch ops.
    """
    if not parallel or len(jobs) < 2 or target.kind != "cpu" or "fork" not in mp.get_all_start_methods():
        return {key: _aoti_one(ep, str(path), target) for key, ep, path in jobs}
    ctx = mp.get_context("fork")
    running = []
    for key, ep, path in jobs:
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_aoti_child, args=(ep, str(path), target, send), daemon=True)
        proc.start()
        send.close()
        running.append((key, proc, receive))
    seconds: dict[str, float] = {}
    errors = []
    for key, proc, receive in running:
        try:
            ok, value = receive.recv()
        except EOFError:
            ok, value = False, "the compile process died"
        proc.join()
        if ok:
            seconds[key] = value
        else:
            errors.append(f"{key}: {value} (exit code {proc.exitcode})")
    if errors:
        raise RuntimeError("AOTInductor compile failed: " + "; ".join(errors))
    return seconds


def _aoti_child(ep: Any, path: str, target: Target, send: Any) -> None:
    import torch

    torch.set_num_threads(1)
    try:
        send.send((True, _aoti_one(ep, path, target)))
    except BaseException as e:  # reported to the parent, which raises
        send.send((False, f"{type(e).__name__}: {e}"))
    finally:
        send.close()


def _check_package(path: Path) -> None:
    """A bundle must hold no pickle, and no library that would crash the process loading it.

    Members we do not expect are refused (a pickle above all). Each shared library must load a shared
    C++ runtime: one that carries its own libstdc++ (a compiler that links it statically) crashes
    beside torch's (see `compiler_problem`, which refuses such compilers before compiling).
    """
    from esper.tezzeret.elf import CXX_RUNTIMES, NotElf, needed_libraries

    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        bad = [
            n
            for n in names
            if not n.endswith(("/", *_PACKAGE_SUFFIXES)) and n.rsplit("/", 1)[-1] not in _PACKAGE_NAMES
        ]
        if bad:
            raise RuntimeError(f"{path.name} holds unexpected members (pickle?): {', '.join(bad[:5])}")
        for name in (n for n in names if n.endswith(".so")):
            try:
                needed = needed_libraries(zf.read(name))
            except NotElf:
                continue  # another architecture's format: nothing this check can say
            if not any(lib.startswith(CXX_RUNTIMES) for lib in needed):
                raise CompilerUnusable(
                    f"{path.name}: {name.rsplit('/', 1)[-1]} loads no shared C++ runtime (needs "
                    f"{', '.join(needed) or 'nothing'}): the compiler {cpp_compiler()} linked libstdc++ into "
                    f"it, and it would crash the process that loads it; {_CXX_FIX}"
                )


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
    *,
    parallel: bool | None = None,
) -> CompileResult:
    """Export and AOT-compile `module`'s three programs into `workdir/bundle`; write its params.

    `parallel`: run the three AOTInductor compiles in parallel processes (default: only if
    $ESPER_PARALLEL_COMPILES is 1; on the 2-core build machine they were slower in parallel); the
    timings record each compile and `aotiOverlap`.

    The module is put in eval mode (see the module docstring). Raises UnsupportedTarget (66) when this
    machine cannot compile for `target`.
    """
    import torch
    from safetensors.torch import save_file
    from torch.export import Dim, export

    from esper.tezzeret import decompositions
    from esper.tezzeret.attention import AttentionLengths, attention_algorithm, math_attention
    from esper.tezzeret.folding import folded_batch_norms

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
    attention = AttentionLengths()
    with torch.no_grad(), attention:
        outs = _as_tuple(module(*xs))
    math_attn = math_attention(attention.lengths, device)
    n_out = len(outs)
    gs = [torch.ones_like(o) for o in outs]
    dynamic = options.maxBatch >= 2
    batch = Dim("batch", min=1, max=options.maxBatch) if dynamic else None
    bdim = {0: batch} if dynamic else None
    pspec = tuple(None for _ in params)
    timings["prepare"] = time.perf_counter() - t0

    # Traced and compiled under the attention algorithm chosen for this kernel (esper.tezzeret.attention),
    # with batch norms folded into their convolutions (esper.tezzeret.folding) and, on CPU, GELU written
    # out (esper.tezzeret.decompositions).
    table = decompositions.for_device(device)
    with attention_algorithm(math_attn), folded_batch_norms(module):
        t0 = time.perf_counter()
        fwd_ep = decompositions.rewrite(
            table,
            export(
                _forward_program(module, names, n_in),
                (*xs, tuple(params)),
                dynamic_shapes=((*([bdim] * n_in), pspec),),  # one entry: the *args tuple
            ),
        )
        timings["exportForward"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        split = _partition(module, names, xs, params, outs, dynamic, table)
        timings["partition"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        train_fwd_ep = export(
            _train_forward_program(split, module, n_in),
            (*xs, tuple(params)),
            dynamic_shapes=((*([bdim] * n_in), pspec),),
        )
        timings["exportTrainForward"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with torch.no_grad():
            train_res = train_fwd_ep.module()(*xs, tuple(params))
        acts = list(train_res[n_out:])
        saved_xs = [{"input": xs, "output": outs, "activation": acts}[s.kind][s.index] for s in split.saved]
        saved_dims = [_saved_dims(s, batch) for s in split.saved]
        train_bwd_ep = export(
            _train_backward_program(split, module, len(split.saved), n_out),
            (*saved_xs, *gs, tuple(params)),
            dynamic_shapes=((*saved_dims, *([bdim] * n_out), pspec),),
        )
        timings["exportTrainBackward"] = time.perf_counter() - t0

        fwd_path = bundle / FORWARD
        train_fwd_path, train_bwd_path = bundle / TRAIN_FORWARD, bundle / TRAIN_BACKWARD
        jobs = [
            ("aotiForward", fwd_ep, fwd_path),
            ("aotiTrainForward", train_fwd_ep, train_fwd_path),
            ("aotiTrainBackward", train_bwd_ep, train_bwd_path),
        ]
        t0 = time.perf_counter()
        timings.update(
            _aoti_compile(jobs, target, parallel=_parallel_compiles() if parallel is None else parallel)
        )
        # Wall time of the compiles minus their sum: negative when they overlapped (so the timings still
        # add up to the wall time).
        timings["aotiOverlap"] = time.perf_counter() - t0 - sum(timings[k] for k, _, _ in jobs)
    for path in (fwd_path, train_fwd_path, train_bwd_path):
        _check_package(path)

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
        train_forward_path=train_fwd_path,
        train_backward_path=train_bwd_path,
        params_path=params_path,
        module=module,
        params=params,
        param_specs=specs,
        input_specs=list(input_specs),
        output_shapes=[tuple(o.shape[1:]) for o in outs],
        target=target,
        toolchain=toolchain_for(target),
        isa=CPU_ISAS[target.capability].name if target.kind == "cpu" else str(target.arch),
        saved=split.saved,
        timings=timings,
    )


def _saved_dims(saved: Saved, batch: Any) -> dict[int, Any] | None:
    """export's dynamic_shapes entry of a saved tensor: each dim that depends on the batch, as the
    batch Dim or a linear expression of it (a*batch + b, e.g. 16*batch after a reshape)."""
    import sympy

    if batch is None:
        return None
    b = sympy.Symbol("batch")
    dims: dict[int, Any] = {}
    for i, d in enumerate(saved.shape):
        if isinstance(d, int):
            continue
        expr = sympy.expand(sympy.sympify(d, locals={"batch": b}))
        a, c = expr.coeff(b, 1), expr.coeff(b, 0)
        if expr != a * b + c or not (a.is_Integer and c.is_Integer):
            raise RuntimeError(f"a saved activation's dim {d} is not linear in the batch")
        dims[i] = batch if (a, c) == (1, 0) else batch * int(a) + int(c)
    return dims or None


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
