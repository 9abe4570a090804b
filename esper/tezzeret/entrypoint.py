"""The compile Job: Blueprint in, verified kernel bundle in the store out, one result line for the operator.

Every way this can end maps to one exit code and one result line (esper.contracts.job) written to
the termination log, because the operator decides retry vs fail from the code and fills the Kernel's
status from the JSON. Cheap checks (blueprint, target, toolchain, key, store) run before the
expensive compile, and a bundle already in the store under the same key is reused: a retried Job
(after a crash past the upload, or a lost status update) costs seconds, not a recompile.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from esper.contracts.common import CompileOptions
from esper.contracts.job import (
    REQUEST_ENV,
    CompileError,
    CompileFailure,
    CompileRequest,
    CompileResult,
    ExitCode,
    result_line,
)
from esper.tezzeret import exitcodes
from esper.tezzeret.exitcodes import (
    InvalidBlueprint,
    NoSigningKey,
    StorageUnavailable,
    TezzeretError,
    ToolchainMismatch,
    UnsupportedTarget,
)

log = logging.getLogger("esper.tezzeret")

DEFAULT_RESULT_PATH = "/dev/termination-log"
RESULT_PATH_ENV = "ESPER_RESULT_PATH"


@dataclass(frozen=True)
class Work:
    """What one run compiles: from a CompileRequest (the Job) or a file and flags (local use)."""

    spec: dict[str, Any]
    target: str
    expect_key: str | None = None
    expect_torch: str | None = None
    blueprint: str | None = None  # the requesting Blueprint's name, if known (recorded in the manifest)


@dataclass
class Plan:
    """What the cheap checks establish before any compile."""

    graph: Any
    options: CompileOptions
    target: Any
    ir_digest: str
    key: str
    toolchain: Any
    blueprint: str | None = None  # recorded in the manifest, not part of the key


# ---------------------------------------------------------------- result line


def error_result(exc: BaseException) -> CompileFailure:
    error = CompileError(
        code=exitcodes.code_for(exc), reason=exitcodes.reason_for(exc), message=str(exc) or type(exc).__name__
    )
    return CompileFailure(error=error)


def write_result(result: CompileResult | CompileFailure, path: str | None) -> str:
    """Write the result line (at most 4 KiB) to `path` (else $ESPER_RESULT_PATH, else the termination
    log); also stdout."""
    line = result_line(result)
    target = path or os.environ.get(RESULT_PATH_ENV) or DEFAULT_RESULT_PATH
    try:
        with open(target, "w", encoding="utf-8") as f:
            f.write(line)
    except OSError as e:
        print(f"tezzeret: warning: cannot write the result to {target}: {e}", file=sys.stderr)
    print(line, flush=True)
    return line


# ---------------------------------------------------------------- blueprint and checks


def load_work(args: argparse.Namespace, env: dict[str, str] | os._Environ[str] = os.environ) -> Work:
    """What to compile: --blueprint FILE with --target (local use), else the Job's $ESPER_COMPILE_REQUEST."""
    if args.blueprint:
        spec, name = load_blueprint(args.blueprint)
        return Work(spec, args.target, args.expect_key, blueprint=name)
    text = env.get(REQUEST_ENV)
    if not text:
        raise InvalidBlueprint(f"no blueprint: give --blueprint FILE or set ${REQUEST_ENV}")
    try:
        request = CompileRequest.model_validate_json(text)
    except ValidationError as e:
        raise InvalidBlueprint(f"${REQUEST_ENV} is not a valid compile request: {e}") from None
    spec = request.spec.model_dump(mode="json")
    return Work(spec, request.target, request.expectKey, request.expectTorch, request.blueprint)


def load_spec(path: str) -> dict[str, Any]:
    """The Blueprint spec from a YAML/JSON file; a whole manifest is unwrapped."""
    return load_blueprint(path)[0]


def load_blueprint(path: str) -> tuple[dict[str, Any], str | None]:
    """(spec, name): the spec as `load_spec` reads it, and the manifest's `metadata.name` (None for a
    bare spec).

    Read with the hardened manifest reader: bad bytes, duplicate keys, alias bombs and deep nesting are
    an InvalidBlueprint (65) with a short message, never a crash.
    """
    from esper.blueprint.errors import cut
    from esper.contracts.manifest import MAX_BYTES, ManifestError, load_one

    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise InvalidBlueprint(f"cannot read blueprint file {path}: {e.strerror}") from None
    source = path
    try:
        doc = load_one(data)
    except ManifestError as e:
        raise InvalidBlueprint(f"{source}: {e}") from None
    name = None
    if isinstance(doc, dict) and ("kind" in doc or "apiVersion" in doc or "spec" in doc):
        meta = doc.get("metadata")
        if isinstance(meta, dict) and isinstance(meta.get("name"), str):
            name = meta["name"][:253]
        if doc.get("kind", "Blueprint") != "Blueprint":
            raise InvalidBlueprint(f"{source}: kind is '{cut(doc.get('kind'))}', expected Blueprint")
        doc = doc.get("spec")
    if not isinstance(doc, dict):
        raise InvalidBlueprint(f"{source}: expected a Blueprint or its spec (a mapping), got {cut(doc)}")
    return doc, name


def plan(
    spec: dict[str, Any], target_name: str, expect_key: str | None, expect_torch: str | None = None
) -> Plan:
    """Validate blueprint, target, toolchain and key without compiling (exit 65/66 on problems)."""
    from esper.artifact import kernel_key
    from esper.blueprint import BlueprintInvalid
    from esper.contracts.validation import validate_blueprint_spec
    from esper.targets import Target
    from esper.tezzeret.compile import toolchain_for, torch_version

    try:
        checked = validate_blueprint_spec(spec)
    except BlueprintInvalid as e:
        lines = "\n".join(str(p) for p in e.problems)
        raise InvalidBlueprint(f"invalid blueprint:\n{lines}") from None
    graph, options = checked.graph, checked.spec.compile
    try:
        target = Target.parse(target_name)
    except ValueError as e:
        raise UnsupportedTarget(str(e)) from None
    if expect_torch and expect_torch not in (torch_version(), _full_torch_version()):
        raise ToolchainMismatch(
            f"this image has torch {torch_version()}, the operator expects {expect_torch}: "
            "the compile image and the operator's toolchain config disagree"
        )
    toolchain = toolchain_for(target)
    ir_digest = checked.digest
    key = kernel_key(ir_digest, target, options, toolchain)
    if expect_key and key != expect_key:
        raise ToolchainMismatch(
            f"kernel key mismatch: computed {key}, expected {expect_key} (irDigest {ir_digest}, "
            f"target {target.name}, torch {toolchain.torch}, capability {toolchain.capability})"
        )
    return Plan(graph, options, target, ir_digest, key, toolchain)


def _full_torch_version() -> str:
    import torch

    return str(torch.__version__)


# ---------------------------------------------------------------- store


@contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Map store failures to exit 75 (transient); artifact content errors stay what they are."""
    from esper.storage import StorageError

    try:
        yield
    except StorageError as e:
        raise StorageUnavailable(f"{what}: {e}") from e
    except (ConnectionError, TimeoutError) as e:
        raise StorageUnavailable(f"{what}: {e}") from e


def open_store_checked(uri: str) -> Any:
    from esper.storage import open_store

    try:
        with storage_errors(f"cannot open store {uri}"):
            return open_store(uri)
    except ValueError as e:
        # A misconfigured store URI is the operator's config, not the Blueprint: retryable once fixed.
        raise StorageUnavailable(str(e)) from None


def existing_result(
    store: Any, p: Plan, workdir: Path, trusted: Any
) -> tuple[CompileResult | None, str | None]:
    """(the result of a bundle already stored under the key, if it downloads and its signature and
    hashes verify with a `trusted` key; else None, why it was not reused or None if there was none)."""
    from esper.artifact import ArtifactError, bundle_size, parse_manifest, read_manifest_bytes, sha256_bytes

    with storage_errors(f"cannot read store {store.uri}"):
        if not store.has_bundle(p.key):
            return None, None
        dest = workdir / "existing"
        try:
            store.fetch_bundle(p.key, dest, trusted=trusted)
        except ArtifactError as e:
            log.warning("stored bundle %s is not trusted (%s); recompiling and replacing it", p.key[:16], e)
            return None, f"the bundle stored under the key did not verify ({e}): recompiled and replaced"
    manifest_bytes = read_manifest_bytes(dest)
    m = parse_manifest(manifest_bytes)
    result = CompileResult(
        key=p.key,
        uri=store.bundle_uri(p.key),
        manifestSha256=sha256_bytes(manifest_bytes),
        size=bundle_size(m, manifest_bytes),
        toolchain=m.toolchain,
        compileSeconds=0.0,
        reused=True,
        report=m.report,
    )
    return result, None


def signing_keys(args: argparse.Namespace, store: Any) -> tuple[Any, Any]:
    """(the private key that signs, the public keys a stored bundle may be signed with to be reused:
    this key's and $ESPER_TRUSTED_KEYS', for rotation). A shared store needs a configured key; a
    local one falls back to the local key pair (created once)."""
    from esper.signing import KeyFileError, TrustedKeys, parse_key_paths, signing_key_from
    from esper.storage.local import LocalStore

    try:
        private = signing_key_from(args.signing_key, local=isinstance(store, LocalStore))
        extra = TrustedKeys.from_paths(parse_key_paths(os.environ.get("ESPER_TRUSTED_KEYS", "")))
    except KeyFileError as e:
        raise NoSigningKey(str(e)) from None
    return private, TrustedKeys([private.public_key(), *extra.public_keys()])


# ---------------------------------------------------------------- compile


def build_bundle(p: Plan, workdir: Path, private_key: Any) -> tuple[Path, float, Any]:
    """Compile, validate, benchmark, write and sign the manifest; returns (bundle dir, seconds, report)."""
    from esper.artifact import IOSpec, Manifest, SavedSpec, verify_bundle, write_manifest
    from esper.blueprint import canonical_dict
    from esper.blueprint.positions import positions
    from esper.signing import TrustedKeys, sign_bundle
    from esper.tezzeret.bench import benchmark, keep_freed_memory, make_report
    from esper.tezzeret.compile import compile_graph
    from esper.tezzeret.validate import load_result_packages, validate

    t0 = time.perf_counter()
    log.info("compiling %s for %s (key %s)", p.ir_digest[:16], p.target.name, p.key[:16])
    result = compile_graph(p.graph, p.target, p.options, workdir)
    log.info("compiled: %s", ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))
    packages = load_result_packages(result)
    checked = validate(result, p.options, packages)
    log.info("validated at batches %s: max error %.3g, grad %.3g", checked.batches,
             checked.max_abs_error, checked.max_grad_error)  # fmt: skip
    kept = keep_freed_memory()  # steady-state steps, not page faults; after it the Job only writes
    report = make_report(checked, benchmark(result, p.options, packages))
    log.info("benchmark: forward x%.2f, train step x%.2f (freed memory %s)", report.speedup,
             report.trainSpeedup, "kept" if kept else "returned to the OS")  # fmt: skip
    pos = positions(p.graph)
    manifest = Manifest(
        key=p.key,
        irDigest=p.ir_digest,
        target=p.target.name,
        options=p.options,
        toolchain=p.toolchain,
        graph=canonical_dict(p.graph),
        inputs=[IOSpec(name=s.name, shape=["batch", *s.shape], dtype=s.dtype) for s in result.input_specs],
        outputs=[
            IOSpec(name=name, shape=["batch", *shape], dtype=result.input_specs[0].dtype)
            for name, shape in zip(p.graph.outputs, result.output_shapes, strict=True)
        ],
        params=result.param_specs,
        saved=[SavedSpec(kind=s.kind, index=s.index, shape=[*s.shape], dtype=s.dtype) for s in result.saved],
        report=report,
        blueprint=p.blueprint,
        mixesPositions=pos.mixesPositions,
        causal=pos.causal,
    )
    write_manifest(result.bundle_dir, manifest)
    sign_bundle(result.bundle_dir, private_key)
    verify_bundle(result.bundle_dir, expected_key=p.key, trusted=TrustedKeys([private_key.public_key()]))
    return result.bundle_dir, time.perf_counter() - t0, report


def run(args: argparse.Namespace, workdir: Path) -> CompileResult:
    """The Job's work; raises TezzeretError subclasses for every expected failure."""
    from esper.devices import check_runtime

    work = load_work(args)
    p = plan(work.spec, work.target, work.expect_key, work.expect_torch)
    p.blueprint = work.blueprint
    log.info("blueprint ok: irDigest %s, key %s", p.ir_digest, p.key)
    why = check_runtime(p.target)
    if why is not None:
        raise UnsupportedTarget(why)
    store = open_store_checked(args.store)
    private_key, trusted = signing_keys(args, store)
    done, replaced = existing_result(store, p, workdir, trusted)
    if done is not None:
        log.info("bundle %s already in %s, signed and verified: not recompiling", p.key[:16], store.uri)
        return done
    bundle_dir, seconds, report = build_bundle(p, workdir, private_key)
    with storage_errors(f"cannot upload to {store.uri}"):
        ref = store.put_bundle(p.key, bundle_dir, replace=replaced is not None)
    log.info("uploaded %s (%d bytes, manifest %s)", ref.uri, ref.size, ref.sha256[:16])
    return CompileResult(
        key=p.key,
        uri=ref.uri,
        manifestSha256=ref.sha256,
        size=ref.size,
        toolchain=p.toolchain,
        compileSeconds=round(seconds, 3),
        replaced=replaced,
        report=report,
    )


def command(blueprint: Path | str, *, target: str, store: Path | str, result_path: Path | str) -> list[str]:
    """The compile Job's command line, for running it as a local process (demo, benchmarks)."""
    return [
        sys.executable,
        "-m",
        "esper.tezzeret",
        "--target",
        target,
        "--store",
        str(store),
        "--blueprint",
        str(blueprint),
        "--result-path",
        str(result_path),
    ]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m esper.tezzeret", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--target", help=f"cpu, cpu-avx512 or cuda-smNN; with --blueprint (else from ${REQUEST_ENV})"
    )
    ap.add_argument("--store", required=True, help="s3://bucket/prefix, file:///path or a path")
    ap.add_argument("--blueprint", help=f"Blueprint (or spec) YAML/JSON file; default ${REQUEST_ENV}")
    ap.add_argument("--expect-key", help="with --blueprint: the kernel key expected; a mismatch exits 66")
    ap.add_argument("--result-path", help=f"default ${RESULT_PATH_ENV} or {DEFAULT_RESULT_PATH}")
    ap.add_argument("--workdir", help="keep the build here (default: a temporary directory)")
    ap.add_argument(
        "--signing-key",
        help="ed25519 private key (PEM) that signs the bundle; default $ESPER_SIGNING_KEY, and for a "
        "local store the local key pair (esper.signing)",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run the compile Job in-process; returns the exit code (esper.contracts.job.ExitCode)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="tezzeret %(asctime)s %(message)s")
    ap = parser()
    try:
        args = ap.parse_args(argv)
        if (args.target or args.expect_key) and not args.blueprint and os.environ.get(REQUEST_ENV):
            ap.error(f"--target and --expect-key come from ${REQUEST_ENV} unless --blueprint is given")
        if args.blueprint and not args.target:
            ap.error("--blueprint needs --target")
    except SystemExit as e:
        code = int(e.code or 0)
        if code:
            error = CompileError(code=code, reason="UsageError", message="bad arguments")
            write_result(CompileFailure(error=error), None)
        return code
    t0 = time.perf_counter()
    try:
        if args.workdir:
            Path(args.workdir).mkdir(parents=True, exist_ok=True)
            result = run(args, Path(args.workdir))
        else:
            with tempfile.TemporaryDirectory(prefix="tezzeret-") as tmp:
                result = run(args, Path(tmp))
    except Exception as e:  # every failure must become a code and a result line
        if not isinstance(e, TezzeretError):
            log.exception("unexpected failure")
        else:
            log.error("%s (exit %d): %s", e.reason, e.code, e)
        write_result(error_result(e), args.result_path)
        return exitcodes.code_for(e)
    log.info("done in %.1fs", time.perf_counter() - t0)
    write_result(result, args.result_path)
    return ExitCode.OK
