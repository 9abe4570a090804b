"""Tezzeret without compiling: exit codes, the result line, tolerances, and every early failure of the Job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from esper import signing
from esper.artifact import Manifest, kernel_key, verify_bundle, write_manifest
from esper.blueprint import digest, validate_source
from esper.contracts.common import CompileOptions, Toolchain, ValidationReport
from esper.contracts.job import REQUEST_ENV, CompileRequest, CompileResult, CompileSpec, ExitCode
from esper.targets import Target
from esper.tezzeret import entrypoint, exitcodes
from esper.tezzeret.bench import BatchTiming, BenchResult, geomean, interleaved_micros, make_report
from esper.tezzeret.compile import Saved, _aoti_compile, toolchain_for, torch_version
from esper.tezzeret.exitcodes import (
    InvalidBlueprint,
    StorageUnavailable,
    ToolchainMismatch,
    UnsupportedTarget,
    ValidationFailed,
)
from esper.tezzeret.validate import ValidationResult, compare, tolerance_for

SPEC: dict[str, Any] = {"template": {"name": "lora-adapter", "params": {"features": 32, "rank": 4}}}


# ---------------------------------------------------------------- exit codes


@pytest.mark.parametrize(
    ("shape", "dtype", "want"),
    [
        (("batch", 16, 8, 8), "float32", 16 * 8 * 8 * 4),
        (("16*batch", 64), "float32", 16 * 64 * 4),
        (("batch", 8), "float16", 16),
        ((64, 8), "float32", 0),  # a fixed size (a parameter's transpose) does not grow with the batch
        ((0,), "float32", 0),
    ],
)
def test_saved_bytes_per_sample(shape: tuple[int | str, ...], dtype: str, want: int) -> None:
    assert Saved("activation", 0, shape, dtype).bytes_per_sample() == want


def test_parallel_compiles_report_every_failure(tmp_path: Path) -> None:
    """A compile that fails in its forked process fails the whole compile, naming the package."""
    jobs = [("aotiForward", object(), tmp_path / "a.pt2"), ("aotiTrainBackward", "x", tmp_path / "b.pt2")]
    with pytest.raises(RuntimeError) as ei:
        _aoti_compile(jobs, Target.parse("cpu"), parallel=True)
    msg = str(ei.value)
    assert msg.startswith("AOTInductor compile failed: aotiForward: ")
    assert "; aotiTrainBackward: " in msg and "(exit code 0)" in msg
    assert not list(tmp_path.iterdir())


def test_exit_codes_are_the_contract() -> None:
    assert (ExitCode.OK, ExitCode.INVALID_BLUEPRINT, ExitCode.UNSUPPORTED_TARGET) == (0, 65, 66)
    assert (ExitCode.VALIDATION_FAILED, ExitCode.TRANSIENT, ExitCode.INTERNAL) == (67, 75, 70)
    cases = {
        InvalidBlueprint: 65,
        UnsupportedTarget: 66,
        ToolchainMismatch: 66,
        ValidationFailed: 67,
        StorageUnavailable: 75,
    }
    for cls, code in cases.items():
        exc = cls("x")
        assert exitcodes.code_for(exc) == code
        assert exc.permanent == (code in (65, 66, 67))
    assert exitcodes.code_for(MemoryError()) == 75
    assert exitcodes.code_for(RuntimeError("bug")) == 70
    assert exitcodes.reason_for(ToolchainMismatch("x")) == "ToolchainMismatch"
    assert exitcodes.reason_for(KeyError("x")) == "InternalError"


# ---------------------------------------------------------------- result line


def test_write_result_warns_when_path_unwritable(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    result = CompileResult(
        key="a" * 64, uri="file:///s/kernels/" + "a" * 64, manifestSha256="b" * 64, size=1,
        toolchain=Toolchain(torch="2.13.0", capability="cpu"),
    )  # fmt: skip
    entrypoint.write_result(result, str(tmp_path / "missing-dir" / "result"))
    out, err = capsys.readouterr()
    assert "cannot write the result" in err
    assert json.loads(out.strip().splitlines()[-1])["manifestSha256"] == "b" * 64


# ---------------------------------------------------------------- tolerance and bench arithmetic


def test_tolerance_by_dtype() -> None:
    f32, f16, bf16 = tolerance_for("float32"), tolerance_for(torch.float16), tolerance_for("bfloat16")
    assert f32.atol <= 1e-4 < f16.atol <= bf16.atol
    assert tolerance_for("float64") == f32


def test_compare_accepts_rounding_and_names_the_failure() -> None:
    tol = tolerance_for("float32")
    want = torch.linspace(-100, 100, 64)
    assert compare("ok", want + 5e-3, want, tol) == pytest.approx(5e-3, rel=1e-2)  # 1e-2 allowed here
    with pytest.raises(ValidationFailed, match=r"batch 7: gradient of param w: max abs error 0\.5"):
        compare("batch 7: gradient of param w", want + 0.5, want, tol)
    bad = want.clone()
    bad[3] = float("nan")
    with pytest.raises(ValidationFailed, match="compiled result has NaN/Inf"):
        compare("out", bad, want, tol)
    with pytest.raises(ValidationFailed, match="eager result has NaN/Inf"):
        compare("out", want, bad, tol)
    with pytest.raises(ValidationFailed, match="shape"):
        compare("out", want[:3], want, tol)


def test_geomean_and_report() -> None:
    assert geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert geomean([]) == 0.0
    bench = BenchResult([BatchTiming(8, 100, 50, 400, 100), BatchTiming(32, 200, 50, 800, 200)])
    report = make_report(ValidationResult(1e-6, 2e-6, 1e-4, (1,)), bench)
    assert isinstance(report, ValidationReport)
    assert report.speedup == pytest.approx((2 * 4) ** 0.5, rel=1e-3)
    assert report.trainSpeedup == pytest.approx(4.0, rel=1e-3)
    assert (report.eagerMicros, report.compiledMicros) == (200, 50)


def test_interleaved_micros_orders_fast_and_slow() -> None:
    fast, slow = interleaved_micros([lambda: None, lambda: sum(range(20000))], budget_s=0.05)
    assert 0 < fast < slow


def test_the_eager_training_step_computes_the_input_gradient_as_the_packages_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same work on both sides: the training packages always return the input's gradient (a seed's input
    is a host activation), so the eager step they are compared with must compute it too."""
    from types import SimpleNamespace

    from esper.tezzeret import validate as tz_validate
    from esper.tezzeret.bench import benchmark
    from esper.tezzeret.compile import InputSpec

    seen: list[torch.Tensor] = []

    class Spy(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled():
                seen.append(x)
            return super().forward(x)

    module = Spy(4, 3)
    params = [p.detach() for p in module.parameters()]
    result = SimpleNamespace(module=module, params=params, input_specs=[InputSpec("x", (4,))])
    monkeypatch.setattr(tz_validate, "train_step", lambda *_: None)
    packages = SimpleNamespace(forward=lambda *_: None)
    options = CompileOptions(benchmarkBatches=[2], maxBatch=4)
    benchmark(result, options, packages, budget_s=0.01)  # type: ignore[arg-type]
    assert seen and all(x.requires_grad for x in seen)
    # d/dx of sum(x @ W.T + b) with ones as the output gradient: every row is W's column sums
    want = params[0].sum(0).expand(2, 4)
    assert seen[-1].grad is not None and torch.allclose(seen[-1].grad, want)


# ---------------------------------------------------------------- the Job's early failures (no compile)


@pytest.fixture
def no_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: Any) -> None:
        raise AssertionError("must not compile")

    monkeypatch.setattr(entrypoint, "build_bundle", boom)


def _run(tmp_path: Path, *args: str, store: str | None = None) -> tuple[int, dict[str, Any]]:
    result = tmp_path / "result.json"
    argv = [
        "--target",
        "cpu",
        "--store",
        store or str(tmp_path / "store"),
        "--result-path",
        str(result),
        *args,
    ]
    code = entrypoint.main(argv)
    return code, json.loads(result.read_text())


def _blueprint(tmp_path: Path, doc: Any) -> str:
    path = tmp_path / "bp.json"
    path.write_text(json.dumps(doc))
    return str(path)


def _key(spec: dict[str, Any], target: str = "cpu") -> str:
    t = Target.parse(target)
    options = CompileOptions.model_validate(spec.get("compile") or {})
    return kernel_key(digest(validate_source(spec)), t, options, toolchain_for(t))


@pytest.mark.usefixtures("no_compile")
def test_missing_blueprint_is_65(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUEST_ENV, raising=False)
    code, doc = _run(tmp_path)
    assert code == 65 and doc["error"]["reason"] == "InvalidBlueprint"
    assert "--blueprint" in doc["error"]["message"]
    code, _ = _run(tmp_path, "--blueprint", str(tmp_path / "nope.yaml"))
    assert code == 65


@pytest.mark.usefixtures("no_compile")
def test_bad_request_in_env_is_65(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(entrypoint.RESULT_PATH_ENV, str(tmp_path / "r"))
    for text in ('{"template": {"name": ', json.dumps({"blueprint": "b", "spec": SPEC, "target": "cpu"})):
        monkeypatch.setenv(REQUEST_ENV, text)
        assert entrypoint.main(["--store", str(tmp_path / "store")]) == 65
        doc = json.loads((tmp_path / "r").read_text())
        assert f"${REQUEST_ENV} is not a valid compile request" in doc["error"]["message"]


def test_request_and_target_flags_are_exclusive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUEST_ENV, _request(SPEC).to_env())
    monkeypatch.setenv(entrypoint.RESULT_PATH_ENV, str(tmp_path / "r"))
    assert entrypoint.main(["--target", "cpu", "--store", str(tmp_path / "store")]) == 2
    assert json.loads((tmp_path / "r").read_text())["error"]["reason"] == "UsageError"


def _request(spec: dict[str, Any], **fields: Any) -> CompileRequest:
    options = CompileOptions.model_validate(spec.get("compile") or {})
    graph = validate_source(spec)
    return CompileRequest(
        blueprint="b", spec=CompileSpec(graph=graph, compile=options), target="cpu", **fields
    )


@pytest.mark.usefixtures("no_compile")
def test_invalid_blueprint_lists_path_messages(tmp_path: Path) -> None:
    manifest = {
        "apiVersion": "esper.dev/v1alpha1",
        "kind": "Blueprint",
        "metadata": {"name": "broken"},
        "spec": {
            "graph": {
                "inputs": [{"name": "x", "shape": ["batch", 64]}],
                "nodes": [
                    {"id": "hidden", "op": "linear", "inputs": ["x"], "params": {"outFeatures": 0}},
                    {"id": "act", "op": "rleu", "inputs": ["hidden"]},
                ],
                "outputs": ["act"],
            }
        },
    }
    code, doc = _run(tmp_path, "--blueprint", _blueprint(tmp_path, manifest))
    assert code == 65
    message = doc["error"]["message"]
    assert "spec.graph.nodes[0].params.outFeatures: " in message
    assert "spec.graph.nodes[1].op: unknown op 'rleu'" in message
    code, doc = _run(tmp_path, "--blueprint", _blueprint(tmp_path, {**manifest, "kind": "Kernel"}))
    assert code == 65 and "expected Blueprint" in doc["error"]["message"]


@pytest.mark.usefixtures("no_compile")
def test_unsupported_targets_are_66(tmp_path: Path) -> None:
    bp = _blueprint(tmp_path, SPEC)
    for target in ("tpu", "cuda-sm42", "CPU"):
        code, doc = (
            entrypoint.main(
                [
                    "--target",
                    target,
                    "--store",
                    str(tmp_path),
                    "--blueprint",
                    bp,
                    "--result-path",
                    str(tmp_path / "r"),
                ]
            ),
            json.loads((tmp_path / "r").read_text()),
        )
        assert code == 66 and doc["error"]["reason"] == "UnsupportedTarget", target
    if not torch.cuda.is_available():
        code = entrypoint.main(
            [
                "--target",
                "cuda-sm90",
                "--store",
                str(tmp_path),
                "--blueprint",
                bp,
                "--result-path",
                str(tmp_path / "r"),
            ]
        )
        assert (
            code == 66 and "needs a CUDA GPU" in json.loads((tmp_path / "r").read_text())["error"]["message"]
        )


@pytest.mark.usefixtures("no_compile")
def test_cpu_avx512_on_a_cpu_without_it_is_66(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Job validates and benchmarks what it compiles: on a node without AVX-512 it stops before
    compiling (a permanent failure: the Job was scheduled onto the wrong node)."""
    from esper import devices

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c\n")
    monkeypatch.setattr(devices, "CPUINFO", cpuinfo)
    bp = _blueprint(tmp_path, {**SPEC, "targets": ["cpu-avx512"]})
    code, doc = _run(tmp_path, "--blueprint", bp, "--target", "cpu-avx512")
    assert code == 66 and doc["error"]["reason"] == "UnsupportedTarget"
    assert "lacks avx512f, avx512bw, avx512cd, avx512dq, avx512vl" in doc["error"]["message"]
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.json"))


@pytest.mark.usefixtures("no_compile")
def test_key_and_torch_mismatch_are_66(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bp = _blueprint(tmp_path, SPEC)
    code, doc = _run(tmp_path, "--blueprint", bp, "--expect-key", "0" * 64)
    assert code == 66 and doc["error"]["reason"] == "ToolchainMismatch"
    assert _key(SPEC) in doc["error"]["message"]
    monkeypatch.setenv(entrypoint.RESULT_PATH_ENV, str(tmp_path / "r"))
    monkeypatch.setenv(REQUEST_ENV, _request(SPEC, expectKey=_key(SPEC), expectTorch="1.0.0").to_env())
    assert entrypoint.main(["--store", str(tmp_path / "store")]) == 66
    assert "torch" in json.loads((tmp_path / "r").read_text())["error"]["message"]
    monkeypatch.setenv(
        REQUEST_ENV, _request(SPEC, expectKey=_key(SPEC), expectTorch=torch_version()).to_env()
    )
    code = entrypoint.main(["--store", str(tmp_path / "f" / "s")])
    assert code != 66  # the checks pass; the (unreachable) store comes next


@pytest.mark.usefixtures("no_compile")
@pytest.mark.parametrize(("target", "other"), [("cpu", "cpu-avx512"), ("cpu-avx512", "cpu")])
def test_the_operator_and_the_job_derive_the_same_key_per_target(
    target: str, other: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator keys a Kernel without torch; the Job recomputes the key and refuses a mismatch (66)."""
    from esper import devices
    from esper_operator.plan import plan_blueprint

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t: avx2 fma f16c avx512f avx512bw avx512cd avx512dq avx512vl\n")
    monkeypatch.setattr(devices, "CPUINFO", cpuinfo)
    plan = plan_blueprint("b", {**SPEC, "targets": [target, other]}, torch_version=torch_version())
    keys = {k.spec.target: k.spec.key for k in plan.kernels}
    assert len(set(keys.values())) == 2
    (tmp_path / "f").write_text("a file: the store after the checks is unreachable")
    monkeypatch.setenv(entrypoint.RESULT_PATH_ENV, str(tmp_path / "r"))
    for key, code, reason in (
        (keys[target], 75, "StorageUnavailable"),
        (keys[other], 66, "ToolchainMismatch"),
    ):
        request = _request(SPEC, expectKey=key, expectTorch=torch_version()).model_copy(
            update={"target": target}
        )
        monkeypatch.setenv(REQUEST_ENV, request.to_env())
        assert entrypoint.main(["--store", str(tmp_path / "f" / "s")]) == code
        assert json.loads((tmp_path / "r").read_text())["error"]["reason"] == reason


@pytest.mark.usefixtures("no_compile")
def test_store_unreachable_is_75(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("a file, not a directory")
    code, doc = _run(tmp_path, "--blueprint", _blueprint(tmp_path, SPEC), store=str(tmp_path / "f" / "s"))
    assert code == 75 and doc["error"]["reason"] == "StorageUnavailable"
    code, doc = _run(tmp_path, "--blueprint", _blueprint(tmp_path, SPEC), store="ftp://host/x")
    assert code == 75


def _fake_stored_bundle(
    tmp_path: Path, spec: dict[str, Any], signer: Ed25519PrivateKey | bool | None = True
) -> tuple[str, str]:
    """A bundle under the spec's real key, with fake package bytes: enough to test reuse, no compile.
    Signed by the local key (what a local compile signs with), by `signer`, or (False) not at all."""
    from esper.storage import open_store

    key = _key(spec)
    d = tmp_path / "bundle"
    d.mkdir()
    for name in ("forward.pt2", "backward.pt2", "params.safetensors"):
        (d / name).write_bytes(name.encode() * 10)
    t = Target.parse("cpu")
    graph = validate_source(spec)
    report = ValidationReport(tolerance=1e-4, maxAbsError=0, eagerMicros=2, compiledMicros=1, speedup=2)
    manifest = Manifest(
        key=key, irDigest=digest(graph), target="cpu", toolchain=toolchain_for(t), graph={}, report=report
    )
    write_manifest(d, manifest)
    if signer is True:
        signer = signing.signing_key_from(local=True)
    if signer:
        signing.sign_bundle(d, signer)
    ref = open_store(str(tmp_path / "store")).put_bundle(key, d)
    return key, ref.sha256


@pytest.mark.usefixtures("no_compile")
def test_existing_bundle_is_reused_without_compiling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key, sha = _fake_stored_bundle(tmp_path, SPEC)
    monkeypatch.setenv(REQUEST_ENV, _request(SPEC, expectKey=key).to_env())
    monkeypatch.setenv(entrypoint.RESULT_PATH_ENV, str(tmp_path / "env-result"))
    assert entrypoint.main(["--store", str(tmp_path / "store")]) == 0
    doc = json.loads((tmp_path / "env-result").read_text())
    assert doc["key"] == key and doc["manifestSha256"] == sha and doc["reused"] is True
    assert doc["uri"].endswith(f"/kernels/{key}") and doc["report"]["speedup"] == 2


def test_corrupt_stored_bundle_is_recompiled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key, _ = _fake_stored_bundle(tmp_path, SPEC)
    (tmp_path / "store" / "kernels" / key / "forward.pt2").write_bytes(b"tampered")
    calls: list[str] = []

    def fake_build(p: entrypoint.Plan, workdir: Path, private_key: Any) -> Any:
        calls.append(p.key)
        raise ValidationFailed("batch 1: forward output 0: max abs error 1 exceeds tolerance")

    monkeypatch.setattr(entrypoint, "build_bundle", fake_build)
    code, doc = _run(tmp_path, "--blueprint", _blueprint(tmp_path, SPEC))
    assert calls == [key]
    assert code == 67 and doc["error"]["reason"] == "ValidationFailed"


@pytest.mark.parametrize("signer", [False, Ed25519PrivateKey.generate()], ids=["unsigned", "foreign"])
def test_untrusted_stored_bundle_is_recompiled_and_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signer: Any
) -> None:
    """A bundle planted under the key (unsigned, or signed by a key the Job does not trust) is not
    reused: the Job compiles, replaces it with its own signed bundle and says why in the result."""
    key, planted_sha = _fake_stored_bundle(tmp_path, SPEC, signer=signer)
    own_key = signing.signing_key_from(local=True)

    def fake_build(p: entrypoint.Plan, workdir: Path, private_key: Any) -> Any:
        assert signing.key_id(private_key.public_key()) == signing.key_id(own_key.public_key())
        d = workdir / "built"
        d.mkdir()
        for name in ("forward.pt2", "backward.pt2", "params.safetensors"):
            (d / name).write_bytes(b"genuine " + name.encode())
        toolchain = toolchain_for(Target.parse("cpu"))
        write_manifest(
            d, Manifest(key=p.key, irDigest=p.ir_digest, target="cpu", toolchain=toolchain, graph={})
        )
        signing.sign_bundle(d, private_key)
        return d, 1.0, None

    monkeypatch.setattr(entrypoint, "build_bundle", fake_build)
    code, doc = _run(tmp_path, "--blueprint", _blueprint(tmp_path, SPEC))
    assert code == 0, doc
    assert doc["reused"] is False and doc["manifestSha256"] != planted_sha
    expected = "unsigned" if signer is False else "not trusted"
    assert "recompiled and replaced" in doc["replaced"] and expected in doc["replaced"]
    stored = tmp_path / "store" / "kernels" / key
    assert (stored / "forward.pt2").read_bytes() == b"genuine forward.pt2"
    trusted = signing.TrustedKeys([own_key.public_key()])
    assert verify_bundle(stored, doc["manifestSha256"], trusted=trusted).key == key


def test_shared_store_without_a_signing_key_is_transient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compile Job for a shared store never signs with an ad-hoc key: no key configured is exit 75."""
    monkeypatch.delenv(signing.SIGNING_KEY_ENV, raising=False)
    store = "s3://esper-unreached/esper"  # the key is checked before the store is read
    code, doc = _run(tmp_path, "--blueprint", _blueprint(tmp_path, SPEC), store=store)
    assert code == ExitCode.TRANSIENT
    assert doc["error"]["reason"] == "NoSigningKey" and "--signing-key" in doc["error"]["message"]


def test_unexpected_crash_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*_: Any) -> None:
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(entrypoint, "build_bundle", crash)
    code, doc = _run(tmp_path, "--blueprint", _blueprint(tmp_path, SPEC))
    assert code == ExitCode.INTERNAL
    assert doc["error"] == {"code": 70, "reason": "InternalError", "message": "inductor exploded"}


def test_usage_error_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(entrypoint.RESULT_PATH_ENV, str(tmp_path / "r"))
    assert entrypoint.main(["--target", "cpu"]) == 2  # no --store
    assert json.loads((tmp_path / "r").read_text())["error"]["reason"] == "UsageError"


def _fake_compiler(tmp_path: Path, name: str, prints: str) -> str:
    """A stand-in `g++` answering `-print-file-name=...` with `prints` (gcc: the bare name if absent)."""
    path = tmp_path / name
    path.write_text(f'#!/bin/sh\necho "{prints}"\n')
    path.chmod(0o755)
    return str(path)


def test_compiler_without_a_shared_libstdcxx_is_refused(tmp_path: Path) -> None:
    from esper.tezzeret.compile import compiler_problem

    shared = tmp_path / "libstdc++.so"
    shared.write_bytes(b"")
    assert compiler_problem(_fake_compiler(tmp_path, "good-g++", str(shared))) is None
    static_only = _fake_compiler(tmp_path, "static-g++", "libstdc++.so")  # gcc's answer when it has none
    why = compiler_problem(static_only)
    assert why is not None and static_only in why and "no shared libstdc++" in why and "CXX" in why
    gone = _fake_compiler(tmp_path, "gone-g++", str(tmp_path / "missing" / "libstdc++.so"))
    assert "no shared libstdc++" in (compiler_problem(gone) or "")
    assert "does not run" in (compiler_problem(str(tmp_path / "no-such-g++")) or "")
    # the build machine's own compiler, the one every other compile test uses, passes
    from esper.tezzeret.compile import cpp_compiler

    assert compiler_problem(cpp_compiler()) is None


def test_a_compile_job_with_an_unusable_compiler_fails_before_compiling(tmp_path: Path) -> None:
    """66 CompilerUnusable, with the compiler named; nothing reaches the store."""
    from torch._inductor import config  # patched with its own context: monkeypatch's undo deletes it

    static_only = _fake_compiler(tmp_path, "static-g++", "libstdc++.so")
    with config.patch({"cpp.cxx": (None, static_only)}):
        code, doc = _run(tmp_path, "--blueprint", _blueprint(tmp_path, SPEC))
    assert code == 66 and doc["error"]["reason"] == "CompilerUnusable"
    assert static_only in doc["error"]["message"]
    assert not list(tmp_path.rglob("manifest.json"))
    with config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        code, doc = _run(tmp_path, "--blueprint", _blueprint(tmp_path, SPEC))
    assert (
        code == 66
        and doc["error"]["reason"] == "CompilerUnusable"
        and "no-such-g++" in doc["error"]["message"]
    )
    assert config.cpp.cxx[1] != static_only  # restored for the tests after this one
