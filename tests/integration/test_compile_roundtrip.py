"""Compile -> bundle -> store -> fetch -> verify -> load -> train, against eager, for real templates,
for the "cpu" target and (where this CPU has AVX-512) "cpu-avx512".

Slow: each template is three AOTInductor compiles (inference forward, training forward, training
backward: ~60 s on 2 cores). The
compiles happen once per session (one fixture) and every test reads the bundles they stored.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import sympy
import torch

from esper.aoti import gather_saved
from esper.artifact import read_manifest, verify_bundle
from esper.blueprint import Graph, build_module, validate_source
from esper.contracts.common import CompileOptions
from esper.contracts.job import REQUEST_ENV, CompileRequest, CompileSpec
from esper.devices import check_runtime
from esper.storage import open_store
from esper.tezzeret import entrypoint
from esper.tezzeret.compile import InputSpec, compile_module
from esper.tezzeret.exitcodes import ValidationFailed
from esper.tezzeret.validate import (
    compare,
    load_packages,
    load_result_packages,
    tolerance_for,
    train_step,
    validate,
)

pytestmark = pytest.mark.slow

COMPILE = {"maxBatch": 128, "validateBatches": [1, 7], "benchmarkBatches": [8, 32]}
TEMPLATES: dict[str, dict[str, Any]] = {
    "residual-mlp": {"features": 32, "hidden": 64, "blocks": 1},
    "lora-adapter": {"features": 32, "rank": 4},
    "transformer-mlp": {"features": 32, "hidden": 64},
    "attention-block": {"embed": 16, "heads": 2, "seq": 8},
    "conv-block": {"channels": 4, "height": 6, "width": 6},
}


NO_AVX512 = check_runtime("cpu-avx512")
CASES = [
    *((name, "cpu") for name in TEMPLATES),
    pytest.param(
        "residual-mlp", "cpu-avx512", marks=pytest.mark.skipif(NO_AVX512 is not None, reason=str(NO_AVX512))
    ),
]


def _spec(name: str, target: str = "cpu") -> dict[str, Any]:
    return {"template": {"name": name, "params": TEMPLATES[name]}, "targets": [target], "compile": COMPILE}


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def compiled(
    store_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], dict[str, Any]]:
    """Run the compile Job in-process once per (template, target) this CPU runs; the result JSON of each."""
    work = tmp_path_factory.mktemp("jobs")
    results = {}
    for name, target in [(n, "cpu") for n in TEMPLATES] + (
        [("residual-mlp", "cpu-avx512")] * (NO_AVX512 is None)
    ):
        bp = work / f"{name}-{target}.json"
        bp.write_text(
            json.dumps({"apiVersion": "esper.dev/v1alpha1", "kind": "Blueprint", "spec": _spec(name, target)})
        )
        out = work / f"{name}-{target}.result"
        code = entrypoint.main(
            ["--target", target, "--store", str(store_dir), "--blueprint", str(bp), "--result-path", str(out)]
        )
        results[name, target] = json.loads(out.read_text())
        assert code == 0, results[name, target]
    return results


def _eager(module: torch.nn.Module, names: list[str], params: list[torch.Tensor], xs: list[torch.Tensor],
           gs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    xr = [x.clone().requires_grad_(True) for x in xs]
    pr = [p.clone().requires_grad_(True) for p in params]
    out = torch.func.functional_call(module, dict(zip(names, pr, strict=True)), tuple(xr))
    outs = list(out) if isinstance(out, tuple) else [out]
    grads = torch.autograd.grad(outs, [*xr, *pr], gs, allow_unused=True, materialize_grads=True)
    return [o.detach() for o in outs], list(grads)


@pytest.mark.parametrize(("name", "target"), CASES)
def test_bundle_round_trip_trains_like_eager(
    name: str, target: str, compiled: dict[tuple[str, str], dict[str, Any]], store_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    result = compiled[name, target]
    assert result["toolchain"]["capability"] == {"cpu": "cpu-avx2", "cpu-avx512": "cpu-avx512"}[target]
    assert result["report"]["maxAbsError"] <= result["report"]["tolerance"]
    assert result["report"]["speedup"] > 0 and result["report"]["trainSpeedup"] > 0
    dest = open_store(str(store_dir)).fetch_bundle(result["key"], tmp_path / "b", result["manifestSha256"])
    manifest = verify_bundle(dest, result["manifestSha256"], expected_key=result["key"])
    packages = ("forward.pt2", "train_forward.pt2", "train_backward.pt2")
    assert set(manifest.files) == {*packages, "params.safetensors"}
    assert manifest.format == "esper.dev/kernel-bundle/v2" and manifest.saved
    for pkg in packages:  # native code and JSON only: nothing to unpickle
        members = zipfile.ZipFile(dest / pkg).namelist()
        assert any(m.endswith(".so") for m in members)
        assert not [m for m in members if m.endswith((".pkl", ".pt", ".pth", ".pickle"))]

    graph = Graph.model_validate(manifest.graph)
    module = build_module(graph, seed=manifest.options.initSeed).eval()
    names = [p.name for p in manifest.params]
    assert names == [n for n, _ in module.named_parameters()]
    stored = load_file(dest / "params.safetensors")
    params = [stored[n] for n in names]
    for n, p in module.named_parameters():  # initial params are the builder's, for the same seed
        assert torch.equal(stored[n], p.detach())

    fwd, train_fwd, train_bwd = load_packages(*(dest / p for p in packages))
    n_out = len(manifest.outputs)

    def bwd(*args: Any) -> Any:
        """A training step's backward: the training forward saves, the training backward consumes."""
        xs, gs, params = args[: len(manifest.inputs)], args[len(manifest.inputs) : -1], args[-1]
        res = train_fwd(*xs, params)
        saved = gather_saved(manifest.saved, xs, res[:n_out], res[n_out:])
        for s, t in zip(manifest.saved, saved, strict=True):  # the manifest's shapes, batch substituted
            want = [int(sympy.sympify(d).subs("batch", xs[0].shape[0])) for d in s.shape]
            assert list(t.shape) == want and str(t.dtype) == f"torch.{s.dtype}"
        return train_bwd(*saved, *gs, params)

    tol = tolerance_for(graph.dtype)
    for batch in (1, 5, 128):  # 5 and 128 are batches neither validation nor tracing used
        gen = torch.Generator().manual_seed(batch)
        xs = [torch.randn(batch, *s.shape[1:], generator=gen) for s in manifest.inputs]
        out = fwd(*xs, tuple(params))
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        gs = [torch.randn(o.shape, generator=gen) for o in outs]
        want_out, want_grads = _eager(module, names, params, xs, gs)
        for got, want in zip(outs, want_out, strict=True):
            assert got.shape == (batch, *manifest.outputs[0].shape[1:])
            compare(f"{name} batch {batch} output", got, want, tol)
        grads = bwd(*xs, *gs, tuple(params))
        assert len(grads) == len(xs) + len(params)
        for i, (got, want) in enumerate(zip(grads, want_grads, strict=True)):
            compare(f"{name} batch {batch} grad {i}", got, want, tol)

    # Training with the packages: a few SGD steps move the params exactly as eager autograd does.
    xs = [torch.randn(16, *s.shape[1:], generator=torch.Generator().manual_seed(0)) for s in manifest.inputs]
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.SGD(ours, lr=0.1)
    for _ in range(3):
        out = fwd(*xs, tuple(p.detach() for p in ours))
        gs = [2 * o / o.numel() for o in (out if isinstance(out, (tuple, list)) else [out])]  # d mean(o^2)
        grads = bwd(*xs, *gs, tuple(p.detach() for p in ours))
        for p, g in zip(ours, grads[len(xs) :], strict=True):
            p.grad = g
        opt.step()
    ref = build_module(graph, seed=manifest.options.initSeed).eval()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):
        ref_opt.zero_grad()
        out = ref(*xs)
        (out if isinstance(out, torch.Tensor) else out[0]).pow(2).mean().backward()
        ref_opt.step()
    for p, (n, r) in zip(ours, ref.named_parameters(), strict=True):
        compare(f"{name} param {n} after 3 steps", p.detach(), r.detach(), tol)


# What would break portability. A "cpu" kernel must run on any x86-64-v3 node: no AVX-512 register
# (zmm, ymm16-31, an opmask). A "cpu-avx512" kernel must run on any x86-64-v4 node: nothing a build node
# may have beyond it (VNNI, BF16, AMX, FP16 arithmetic, VBMI, IFMA).
AVX512_REGISTERS = re.compile(r"%zmm\d|%[xy]mm(1[6-9]|2\d|3[01])\b|\{%k[1-7]\}")
BEYOND_V4 = re.compile(
    r"\s(vpdpbusds?|vpdpwssds?|vcvtne2?ps2bf16|vdpbf16ps|ldtilecfg|tileloadd\w*|tdp\w+|"
    r"v(add|sub|mul|div|fn?madd\d+)ph|vperm[ti]?2?b|vpmultishiftqb|vpmadd52[lh]uq)\s"
)


def _disassembly(package: Path, tmp: Path) -> tuple[set[str], str]:
    """The AOTI_CPU_ISA each library of `package` records, and their disassembly."""
    isas, asm = set(), []
    with zipfile.ZipFile(package) as zf:
        for member in zf.namelist():
            if member.endswith("_metadata.json"):
                isas.add(json.loads(zf.read(member))["AOTI_CPU_ISA"])
            elif member.endswith(".so"):
                lib = tmp / Path(member).name
                lib.write_bytes(zf.read(member))
                cmd = ["objdump", "-d", "--no-show-raw-insn", str(lib)]
                asm.append(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return isas, "\n".join(asm)


@pytest.mark.parametrize(("name", "target"), CASES)
def test_cpu_packages_use_exactly_their_targets_isa(
    name: str, target: str, compiled: dict[tuple[str, str], dict[str, Any]], store_dir: Path, tmp_path: Path
) -> None:
    """Built here (a CPU with AVX-512, VNNI and BF16), each package uses its target's ISA and no more.

    Inductor alone would pick the build CPU's richest ISA ("avx512 avx512_vnni" here) and its flags.
    """
    bundle = store_dir / "kernels" / compiled[name, target]["key"]
    for package in ("forward.pt2", "train_forward.pt2", "train_backward.pt2"):
        isas, asm = _disassembly(bundle / package, tmp_path)
        assert asm.count("\n") > 1000, package  # a real disassembly
        where = f"{name} {target} {package}"
        if target == "cpu":
            assert isas == {"AVX2"}, where
            assert not AVX512_REGISTERS.search(asm), (where, AVX512_REGISTERS.search(asm))
        else:
            assert isas == {"AVX512"}, where
            assert "%zmm" in asm, where  # the vector code is 512-bit
            assert not BEYOND_V4.search(asm), (where, BEYOND_V4.search(asm))


@pytest.mark.skipif(NO_AVX512 is not None, reason=str(NO_AVX512))
def test_an_avx512_kernel_loads_where_the_cpu_has_it_and_is_refused_elsewhere(
    compiled: dict[tuple[str, str], dict[str, Any]],
    store_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The runtime checks the manifest's target against this CPU before loading any native code."""
    from esper import devices
    from esper.kasmina import KernelLoadError, load_kernel

    result, plain = compiled["residual-mlp", "cpu-avx512"], compiled["residual-mlp", "cpu"]
    assert result["key"] != plain["key"]  # the capability is part of the key
    bundle = store_dir / "kernels" / result["key"]
    kernel = load_kernel(bundle, result["manifestSha256"])
    assert kernel.target == "cpu-avx512"
    manifest = read_manifest(bundle)
    graph = Graph.model_validate(manifest.graph)
    ref = build_module(graph, seed=manifest.options.initSeed)
    x = torch.randn(9, *manifest.inputs[0].shape[1:])
    xk, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    kernel(xk).square().sum().backward()
    ref(xr).square().sum().backward()
    compare("input grad through KernelModule", xk.grad, xr.grad, tolerance_for(graph.dtype))

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t: fpu sse2 avx avx2 fma f16c bmi1 bmi2 movbe\n")  # an AVX2-only node
    monkeypatch.setattr(devices, "CPUINFO", cpuinfo)
    with pytest.raises(KernelLoadError) as e:
        load_kernel(bundle, result["manifestSha256"])
    assert e.value.reason == "UnsupportedTarget" and "lacks avx512f" in e.value.message
    plain_bundle = store_dir / "kernels" / plain["key"]
    assert load_kernel(plain_bundle, plain["manifestSha256"]).target == "cpu"  # AVX2 kernels still load


def test_short_attention_is_compiled_in_its_math_form(
    compiled: dict[tuple[str, str], dict[str, Any]], store_dir: Path
) -> None:
    """8 positions: matmuls and a softmax in every package, no call of the CPU flash kernel (its
    numerics against eager are the round trip's above)."""
    bundle = store_dir / "kernels" / compiled["attention-block", "cpu"]["key"]
    for package in ("forward.pt2", "train_forward.pt2", "train_backward.pt2"):
        with zipfile.ZipFile(bundle / package) as zf:
            code = "".join(zf.read(m).decode() for m in zf.namelist() if m.endswith(".cpp"))
        assert "flash_attention" not in code and "aoti_torch_cpu_bmm_out" in code, package


@pytest.mark.parametrize("name", ["residual-mlp", "transformer-mlp"])
def test_gelu_is_compiled_as_inline_arithmetic(
    name: str, compiled: dict[tuple[str, str], dict[str, Any]], store_dir: Path
) -> None:
    """Every package of a GELU template evaluates it without an erf or exp call (esper.tezzeret.
    decompositions; that it still trains like eager is the round trip's above)."""
    bundle = store_dir / "kernels" / compiled[name, "cpu"]["key"]
    for package in ("forward.pt2", "train_forward.pt2", "train_backward.pt2"):
        with zipfile.ZipFile(bundle / package) as zf:
            code = "".join(zf.read(m).decode() for m in zf.namelist() if m.endswith("kernel.cpp"))
        assert "<<" in code, package  # the exponent bits of exp_nonpositive: GELU is in this package
        assert ".erf()" not in code and ".exp()" not in code and "Sleef" not in code, package


def test_batch_norm_is_folded_into_the_convolutions(
    compiled: dict[tuple[str, str], dict[str, Any]], store_dir: Path
) -> None:
    """No package of the conv block computes a batch norm: each one is folded into the convolution before
    it (esper.tezzeret.folding; that it still trains like eager, batch-norm parameters included, is the
    round trip's above)."""
    bundle = store_dir / "kernels" / compiled["conv-block", "cpu"]["key"]
    for package in ("forward.pt2", "train_forward.pt2", "train_backward.pt2"):
        with zipfile.ZipFile(bundle / package) as zf:
            code = "".join(zf.read(m).decode() for m in zf.namelist() if m.endswith(".cpp"))
        assert "convolution" in code and "batch_norm" not in code, package


def test_rerun_reuses_the_stored_bundle(
    compiled: dict[tuple[str, str], dict[str, Any]], store_dir: Path, tmp_path: Path
) -> None:
    """A retried Job (a real `python -m esper.tezzeret` process) finds the bundle and compiles nothing."""
    first = compiled["lora-adapter", "cpu"]
    bundle = store_dir / "kernels" / first["key"]
    before = (bundle / "manifest.json").stat().st_mtime_ns
    spec = _spec("lora-adapter")
    request = CompileRequest(
        blueprint="lora-adapter",
        spec=CompileSpec(
            graph=validate_source(spec), compile=CompileOptions.model_validate(spec.get("compile") or {})
        ),
        target="cpu",
        expectKey=first["key"],
    )
    env = {**os.environ, REQUEST_ENV: request.to_env()}
    proc = subprocess.run(
        [sys.executable, "-m", "esper.tezzeret", "--store", str(store_dir),
         "--result-path", str(tmp_path / "r")],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "r").read_text())
    assert again["reused"] is True and again["compileSeconds"] == 0
    assert {k: again[k] for k in ("key", "uri", "manifestSha256", "size")} == {
        k: first[k] for k in ("key", "uri", "manifestSha256", "size")
    }
    assert again["report"] == first["report"]
    assert "not recompiling" in proc.stderr
    assert (bundle / "manifest.json").stat().st_mtime_ns == before
    assert read_manifest(bundle).key == first["key"]


class TwoHeads(torch.nn.Module):
    """Two inputs, two outputs, batch norm and dropout (eval semantics), and a parameter no output uses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 24)
        self.bn = torch.nn.BatchNorm1d(24)
        self.drop = torch.nn.Dropout(0.5)
        self.gate = torch.nn.Linear(8, 24)
        self.unused = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.drop(torch.relu(self.bn(self.fc(x))))
        return h * torch.sigmoid(self.gate(y)), h.sum(dim=1, keepdim=True)


def test_compile_module_multi_io_eval_semantics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = TwoHeads()
    module.bn.running_mean.normal_()
    module.bn.running_var.uniform_(0.5, 2.0)
    options = CompileOptions(maxBatch=64, validateBatches=[1, 3])
    specs = [InputSpec("x", (16,)), InputSpec("y", (8,))]
    result = compile_module(module, specs, "cpu", options, tmp_path, parallel=True)  # forked compiles
    assert result.timings["aotiOverlap"] < 0 < result.timings["aotiTrainBackward"]
    assert result.output_shapes == [(24,), (1,)]
    names = [s.name for s in result.param_specs]
    assert names == [n for n, _ in module.named_parameters()]  # registration order: own params first
    packages = load_result_packages(result)
    x, y = torch.randn(9, 16), torch.randn(9, 8)
    params = tuple(result.params)
    a, b = packages.forward(x, y, params)
    ea, eb = module.eval()(x, y)  # eval: dropout is the identity, bn uses the running stats
    compare("out a", a, ea.detach(), tolerance_for("float32"))
    compare("out b", b, eb.detach(), tolerance_for("float32"))
    (ta, tb), grads = train_step(result, packages, [x, y], [torch.ones_like(a), torch.ones_like(b)])
    compare("training out a", ta, ea.detach(), tolerance_for("float32"))
    compare("training out b", tb, eb.detach(), tolerance_for("float32"))
    assert len(grads) == 2 + len(params)
    assert torch.count_nonzero(grads[2 + names.index("unused")]) == 0  # zeros, not None
    ga, gb = torch.randn(9, 24), torch.randn(9, 1)
    _, want = _eager(module, names, list(params), [x, y], [ga, gb])
    _, got = train_step(result, packages, [x, y], [ga, gb])
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        compare(f"grad {i}", g, w, tolerance_for("float32"))
    assert {s.kind for s in result.saved} >= {"activation"}  # the backward reads what the forward kept
    assert validate(result, options, packages).max_grad_error <= 1e-4

    # A training backward that is off by 1% in one gradient is caught by the compiler's validation.
    def skewed(*args: Any) -> tuple[torch.Tensor, ...]:
        out = list(packages.train_backward(*args))
        out[-1] = out[-1] * 1.01 + 1e-3
        return tuple(out)

    with pytest.raises(ValidationFailed, match=r"batch 1: gradient of param gate\.bias"):
        validate(result, options, packages._replace(train_backward=skewed))
    # Note: the package does not enforce maxBatch at run time; the loader must (see compile-road.md).
