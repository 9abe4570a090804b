"""`esper`: the compiler and the runtime on one machine, with no cluster.

Exit codes: 0 ok, 1 the input is invalid (one `file: path: message` line per problem), 2 usage or an
unreadable file; `compile` passes the compiler's own codes through (65 invalid, 66 target, 67
validation, 75 transient).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from rich.console import Console
from rich.table import Table

from esper.artifact import bundle_size, parse_manifest
from esper.blueprint import OPS, TEMPLATES, BlueprintInvalid
from esper.blueprint.errors import cut
from esper.contracts.manifest import MAX_BYTES, ManifestError
from esper.contracts.manifest import load_documents as read_yaml
from esper.contracts.validation import (
    document_kind,
    envelope_problems,
    validate_blueprint,
    validate_blueprint_spec,
)
from esper.storage import open_store

DEFAULT_STORE = ".esper/store"

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])
console = Console()


class InputError(Exception):
    """A file that cannot be read or parsed: exit 2."""


def read_manifests(path: Path) -> list[tuple[str, Any, str]]:
    """(label, document, what) for each document of a YAML/JSON file, read with the hardened reader.

    `what` is "blueprint" (a Blueprint, or a near miss such as `kind: blueprint`: an error, not another
    kind) or "spec" (a bare spec); other resources of a manifest (a Pod, RBAC) are skipped with a note.
    """
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        docs = [d for d in read_yaml(data) if d is not None]
    except ManifestError as exc:
        raise InputError(f"{path}: {exc}") from None
    if not docs:
        raise InputError(f"{path}: no documents")
    out: list[tuple[str, Any, str]] = []
    skipped: list[str] = []
    for i, doc in enumerate(docs):
        label = f"{path}" if len(docs) == 1 else f"{path}#{i}"
        what: str = document_kind(doc)
        if what == "other":
            skipped.append(f"{label}: kind {cut(doc.get('kind'))} is not a Blueprint: skipped")
            continue
        meta = doc.get("metadata") if isinstance(doc, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        out.append((f"{label} ({cut(name)})" if isinstance(name, str) and name else label, doc, what))
    if not out:
        kinds = ", ".join(sorted({cut(d.get("kind")) for d in docs if isinstance(d, dict)}))
        typer.echo(f"{path}: no Blueprint in this file ({kinds}): skipped", err=True)
    else:
        for note in skipped:
            typer.echo(note, err=True)
    return out


def load_documents(path: Path) -> list[tuple[str, Any]]:
    """(label, Blueprint spec) for each Blueprint of a YAML/JSON file; a bare spec is accepted too.

    A Blueprint's envelope (apiVersion, kind, metadata) is checked here; its spec by the compiler.
    """
    out = []
    for label, doc, what in read_manifests(path):
        if what == "blueprint":
            problems = envelope_problems(doc)
            if problems:
                raise InputError("\n".join(f"{label}: {p.path}: {p.message}" for p in problems))
            doc = doc["spec"]
        out.append((label, doc))
    return out


T = TypeVar("T")


def _read_every(files: list[Path], read: Callable[[Path], list[T]]) -> list[T]:
    """`read` of every file, concatenated; exit 2 on an unreadable file or when there is none at all."""
    docs: list[T] = []
    for path in files:
        try:
            docs.extend(read(path))
        except InputError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
    if not docs:
        typer.echo("no Blueprint in the given files", err=True)
        raise typer.Exit(2)
    return docs


def load_all(files: list[Path]) -> list[tuple[str, Any]]:
    """The Blueprints of every file; exit 2 on an unreadable file or when there is none at all."""
    return _read_every(files, load_documents)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Blueprint manifests (YAML or JSON).")],
) -> None:
    """Check Blueprints as the operator would; print one line per problem."""
    docs = _read_every(files, read_manifests)
    bad = False
    for label, doc, what in docs:
        try:
            checked = validate_blueprint(doc).checked if what == "blueprint" else validate_blueprint_spec(doc)
        except BlueprintInvalid as exc:
            bad = True
            for problem in exc.problems:
                typer.echo(f"{label}: {problem.path}: {problem.message}", err=True)
            continue
        typer.echo(f"{label}: ok, digest {checked.digest[:16]}")
    if bad:
        raise typer.Exit(1)


@contextlib.contextmanager
def _quiet_torch() -> Any:
    """torch's deprecation warnings and log lines from inside export and inductor are about torch,
    not about the Blueprint: the table and the error lines say what the user needs."""
    import torch  # noqa: F401  (its import configures the "torch" logger: take the level after it)

    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in (DeprecationWarning, FutureWarning, UserWarning):
                warnings.filterwarnings("ignore", category=category, module=r"(torch|copyreg)(\.|$)")
            yield
    finally:
        torch_log.setLevel(level)


@app.command("compile")
def compile_(
    files: Annotated[list[Path], typer.Argument(help="Blueprint manifests (YAML or JSON).")],
    target: Annotated[
        list[str] | None, typer.Option(help="Target(s); default: each Blueprint's spec.targets.")
    ] = None,
    store: Annotated[str, typer.Option(help="Store URI: a directory or s3://bucket/prefix.")] = DEFAULT_STORE,
) -> None:
    """Compile Blueprints into kernel bundles, exactly as the operator's compile Jobs do."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from esper.contracts.job import CompileError, CompileFailure, CompileResult, read_result
    from esper.tezzeret.entrypoint import main as tezzeret

    jobs: list[tuple[str, Any, str]] = []
    for label, spec in load_all(files):
        targets = target or (spec if isinstance(spec, dict) else {}).get("targets") or ["cpu"]
        name = label.rsplit(" (", 1)[-1].rstrip(")") if " (" in label else Path(label).stem
        jobs.extend((name, spec, t) for t in targets)
    results: list[tuple[str, str, int, CompileResult | CompileFailure]] = []
    failed = 0
    logging.getLogger("esper.tezzeret").setLevel(logging.CRITICAL)  # the table and errors below say it
    with tempfile.TemporaryDirectory(prefix="esper-compile-") as tmp:
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            for i, (label, spec, t) in enumerate(jobs):
                task = progress.add_task(f"compiling {label} for {t}", total=None)
                spec_file, result_file = Path(tmp) / f"{i}.json", Path(tmp) / f"{i}.result"
                # The name travels as the manifest's metadata: the bundle's manifest records it.
                spec_file.write_text(json.dumps({"metadata": {"name": label}, "spec": spec}))
                argv = ["--blueprint", str(spec_file), "--target", t, "--store", store]
                with contextlib.redirect_stdout(io.StringIO()), _quiet_torch():
                    code = tezzeret([*argv, "--result-path", str(result_file)])
                progress.remove_task(task)
                result = read_result(result_file, code)
                results.append((label, t, code, result))
                failed = failed or code
    table = Table(title=f"compiled into {store}")
    for column in ("blueprint", "target", "result", "key", "max err", "fwd", "train", "s"):
        table.add_column(column, no_wrap=column in ("result", "key", "max err"))
    for name, t, code, result in results:
        if code or isinstance(result, CompileFailure):
            error = (
                result.error
                if isinstance(result, CompileFailure)
                else CompileError(code=code, reason="Failed")
            )
            table.add_row(name, t, f"[red]failed ({code})[/]")
            typer.echo(f"{name} ({t}): {error.reason}", err=True)
            for line in error.message.splitlines():
                typer.echo(f"{name} ({t}): {line}", err=True)
            continue
        report = result.report
        table.add_row(
            name,
            t,
            "reused" if result.reused else "compiled",
            result.key[:12],
            f"{report.maxAbsError if report else 0:.0e}",
            f"{report.speedup if report else 0:.2f}x",
            f"{report.trainSpeedup if report else 0:.2f}x",
            f"{result.compileSeconds:.0f}",
        )
    console.print(table)
    if failed:
        raise typer.Exit(failed)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its PNG and JSON.")] = Path(
        ".esper/demo"
    ),
    store: Annotated[Path, typer.Option(help="Local store the examples compile into.")] = Path(DEFAULT_STORE),
    quick: Annotated[bool, typer.Option(help="Fewer steps and one kernel (about a minute).")] = False,
    update_docs: Annotated[bool, typer.Option(help="Also write docs/demo-loss.png.")] = False,
    workers: Annotated[
        int, typer.Option(min=1, help="Also grow on N data-parallel workers (torchrun, gloo, CPU).")
    ] = 1,
) -> None:
    """The main job: compile the example Blueprints, then grow a model with them and compare."""
    from esper.demo import DemoError, run_demo

    docs_png = Path("docs/demo-loss.png") if update_docs else None
    try:
        result = run_demo(
            workdir, quick=quick, console=console, docs_png=docs_png, store=store, workers=workers
        )
    except DemoError as exc:
        typer.echo(f"esper demo: {exc}", err=True)
        raise typer.Exit(1) from None
    console.print(f"loss curves: {result.png}   numbers: {result.json_path}")


@app.command()
def kernels(
    store: Annotated[str, typer.Option(help="Store URI: a directory or s3://bucket/prefix.")] = DEFAULT_STORE,
    cluster: Annotated[bool, typer.Option("--cluster", help="List Kernel objects from the cluster.")] = False,
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="Namespace (--cluster).")] = "default",
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A", help="Every namespace.")] = False,
    blueprint: Annotated[str | None, typer.Option(help="Used by this Blueprint (--cluster).")] = None,
    template: Annotated[str | None, typer.Option(help="Expanded from this template (--cluster).")] = None,
    target: Annotated[str | None, typer.Option(help="For this target.")] = None,
    phase: Annotated[str | None, typer.Option(help="In this phase (--cluster).")] = None,
    min_speedup: Annotated[float | None, typer.Option(help="At least this speed-up over eager.")] = None,
    selector: Annotated[str | None, typer.Option("--selector", "-l", help="Label selector.")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="table or json.")] = "table",
    as_json: Annotated[bool, typer.Option("--json", help="Same as -o json.")] = False,
    causal: Annotated[
        bool | None,
        typer.Option(
            "--causal/--non-causal",
            help="Only kernels that are (or are not) causal: safe in a language model. Default: all.",
        ),
    ] = None,
    kubeconfig: Annotated[str | None, typer.Option(help="Kubeconfig (default $KUBECONFIG).")] = None,
) -> None:
    """List Kernels: the bundles in a store (Blueprint, shapes, causality, validation figures and the
    manifest sha256 that `load_kernel(..., expected_sha256=...)` takes), or (--cluster) the Kernel
    objects, filtered."""
    from esper.cli import catalogue

    if output not in ("table", "json"):
        typer.echo(f"-o must be table or json, got {output!r}", err=True)
        raise typer.Exit(2)
    try:
        query = catalogue.KernelQuery(blueprint, template, target, phase, min_speedup, selector)
        if not cluster:
            query.store_only()
    except catalogue.CatalogueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    if cluster:
        if causal is not None:
            typer.echo("--causal/--non-causal read bundle manifests: give --store, not --cluster", err=True)
            raise typer.Exit(2)
        _cluster_kernels(
            query, kubeconfig, None if all_namespaces else namespace, as_json or output == "json"
        )
        return
    if "://" not in store and not Path(store).is_dir():
        typer.echo(f"{store}: no such store directory", err=True)
        raise typer.Exit(2)
    try:
        backend = open_store(store)
        manifests = [
            (data, parse_manifest(data)) for data in map(backend.read_manifest_bytes, backend.list_keys())
        ]
    except Exception as exc:
        typer.echo(f"{store}: {exc}", err=True)
        raise typer.Exit(2) from None
    rows: list[dict[str, Any]] = []
    for data, m in manifests:
        if causal is not None and m.causal is not causal:
            continue
        report = m.report
        size = bundle_size(m, data)
        if target is not None and m.target != target:
            continue
        if not query.keeps_speedup(report.speedup if report else None):
            continue
        rows.append(
            {
                "key": m.key,
                "blueprint": m.blueprint,
                "target": m.target,
                "inputs": [i.shape for i in m.inputs],
                "outputs": [o.shape for o in m.outputs],
                "mixesPositions": m.mixesPositions,
                "causal": m.causal,
                "manifestSha256": hashlib.sha256(data).hexdigest(),
                "irDigest": m.irDigest,
                "params": sum(_numel(p.shape) for p in m.params),
                "size": size,
                "maxAbsError": report.maxAbsError if report else None,
                "speedup": report.speedup if report else None,
                "trainSpeedup": report.trainSpeedup if report else None,
                "createdAt": m.createdAt,
            }
        )
    if as_json or output == "json":
        console.print_json(json.dumps(rows))
        return
    # The table keeps what a user picks a kernel by; --json has every field (size, speedup, dates).
    table = Table(title=f"kernels in {store}")
    for column in ("key", "blueprint", "target", "input -> output", "causal", "params", "max error"):
        table.add_column(column, justify="right" if column in ("params", "max error") else "left")
    table.add_column("train speedup", justify="right")
    table.add_column("manifest sha256", overflow="fold", min_width=16)
    for r in rows:
        table.add_row(
            r["key"][:16],
            r["blueprint"] or "-",
            r["target"],
            f"{_shapes(r['inputs'])} -> {_shapes(r['outputs'])}",
            {True: "yes", False: "no", None: "-"}[r["causal"]],
            f"{r['params']:,}",
            f"{r['maxAbsError']:.1e}" if r["maxAbsError"] is not None else "-",
            f"{r['trainSpeedup']:.2f}x" if r["trainSpeedup"] else "-",
            r["manifestSha256"],
        )
    console.print(table)


def _cluster_kernels(query: Any, kubeconfig: str | None, namespace: str | None, as_json: bool) -> None:
    """`esper kernels --cluster`: the Kernel objects matching `query` (every namespace when None)."""
    from esper.cli import catalogue

    with _cluster_errors():
        rows = catalogue.list_cluster_kernels(_custom_api(kubeconfig), query, namespace)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title="kernels" + (f" in {namespace}" if namespace else ""))
    columns = ("name", "blueprints", "template", "target", "phase", "speedup", "size")
    for column in columns if namespace else ("namespace", *columns):
        table.add_column(column, no_wrap=column in ("namespace", "name"))
    for r in rows:
        table.add_row(
            *([] if namespace else [r["namespace"]]), r["name"], ",".join(r["blueprints"]),
            r["template"], r["target"],
            r["phase"] + (f" ({r['reason']})" if r["phase"] != "Ready" and r["reason"] else ""),
            f"{r['speedup']:.2f}x" if r["speedup"] else "-", _bytes(r["size"]) if r["size"] else "-",
        )  # fmt: skip
    console.print(table)


def _shapes(shapes: list[list[int | str]]) -> str:
    """`(batch, 64)`: parentheses, since rich reads `[...]` as markup."""
    return ", ".join("(" + ", ".join(map(str, s)) + ")" for s in shapes)


@app.command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="A kernel bundle directory.")],
    public_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--public-key",
            help="Trusted ed25519 public key (PEM), or a directory of *.pub; repeatable. Default: "
            "$ESPER_TRUSTED_KEYS, else the local key pair's public key.",
        ),
    ] = None,
) -> None:
    """Check a bundle's signature and every file's sha256, as the runtime does before loading it.

    Exit 0 when everything holds; 1 with the reason otherwise (unsigned, a foreign or broken
    signature, an edited manifest, a changed or extra file); 2 for an unreadable key.
    """
    from esper.artifact import ArtifactError, verify_bundle
    from esper.signing import KeyFileError, resolve_trusted

    try:
        trusted = resolve_trusted(public_key or None)
    except KeyFileError as exc:
        typer.echo(f"esper verify: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        manifest = verify_bundle(bundle, trusted=trusted)
    except ArtifactError as exc:
        typer.echo(f"{bundle}: NOT VERIFIED: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{bundle}: verified: key {manifest.key}, {len(manifest.files)} files, signature holds")


@app.command()
def keygen(
    directory: Annotated[Path, typer.Argument(help="Where to write signing.key and signing.pub.")],
    force: Annotated[bool, typer.Option(help="Replace an existing signing.key.")] = False,
) -> None:
    """Create an ed25519 key pair for signing bundles (for the cluster's signing-key Secret)."""
    from esper.signing import generate_key_pair

    try:
        private, public = generate_key_pair(directory, overwrite=force)
    except (FileExistsError, OSError) as exc:
        typer.echo(f"esper keygen: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {private} (secret: compile Jobs only) and {public} (trusted by the runtime)")


def _custom_api(kubeconfig: str | None) -> Any:
    """CustomObjectsApi for the kubeconfig given, else $KUBECONFIG or ~/.kube/config, else in-cluster."""
    from kubernetes import client, config

    from esper.sidecar.sync import make_api_client

    if kubeconfig:
        return client.CustomObjectsApi(config.new_client_from_config(config_file=kubeconfig))
    return client.CustomObjectsApi(make_api_client())


@contextlib.contextmanager
def _cluster_errors(prefix: str = "cluster") -> Iterator[None]:
    """The exit codes of the commands that talk to a cluster: a request the catalogue refuses (a Kernel
    that is not Failed, no such revision) exits 1 with its reason; any other error of the API server or
    the store exits 2 with what it said."""
    from esper.cli import catalogue

    try:
        yield
    except catalogue.CatalogueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    except typer.Exit:
        raise
    except Exception as exc:
        typer.echo(f"{prefix}: {_api_error(exc)}", err=True)
        raise typer.Exit(2) from None


def _api_error(exc: Exception) -> str:
    status, reason = getattr(exc, "status", None), getattr(exc, "reason", None)
    if status is not None:
        body = getattr(exc, "body", "") or ""
        with contextlib.suppress(ValueError, TypeError):
            body = json.loads(body).get("message", body)
        return f"HTTP {status} {reason}: {body}".strip()
    return str(exc)


@app.command()
def retry(
    names: Annotated[list[str], typer.Argument(help="Failed Kernels to compile again.")],
    namespace: Annotated[str, typer.Option("--namespace", "-n")] = "default",
    kubeconfig: Annotated[str | None, typer.Option(help="Kubeconfig (default $KUBECONFIG).")] = None,
) -> None:
    """Compile Failed Kernels again (sets the esper.dev/retry annotation the operator acts on)."""
    from esper.cli import catalogue

    with _cluster_errors():
        done = catalogue.retry_kernels(_custom_api(kubeconfig), namespace, names)
    for name in done:
        typer.echo(f"kernel/{name}: retry requested")


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="The Blueprint.")],
    to_revision: Annotated[int | None, typer.Option(help="A revision in status.history.")] = None,
    namespace: Annotated[str, typer.Option("--namespace", "-n")] = "default",
    kubeconfig: Annotated[str | None, typer.Option(help="Kubeconfig (default $KUBECONFIG).")] = None,
) -> None:
    """Point a Blueprint back at a previous revision; its kept Kernels serve again at once."""
    from esper.cli import catalogue

    with _cluster_errors():
        revision = catalogue.rollback(_custom_api(kubeconfig), namespace, name, to_revision)
    typer.echo(f"blueprint/{name}: rolled back to the Kernels of revision {revision}")


@app.command()
def gc(
    store: Annotated[str, typer.Option(help="Store URI: a directory or s3://bucket/prefix.")] = DEFAULT_STORE,
    delete: Annotated[bool, typer.Option("--delete", help="Delete them (default: only list).")] = False,
    min_age: Annotated[str, typer.Option(help="Only bundles at least this old: 90s, 30m, 6h, 7d.")] = "1h",
    kubeconfig: Annotated[str | None, typer.Option(help="Kubeconfig (default $KUBECONFIG).")] = None,
) -> None:
    """List (or --delete) bundles in the store that no Kernel in any namespace references."""
    from esper.cli import catalogue

    try:
        age = catalogue.parse_age(min_age)
    except catalogue.CatalogueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    with _cluster_errors("gc"):
        api = _custom_api(kubeconfig)
        backend = open_store(store)
        orphans = catalogue.find_orphans(backend, lambda: catalogue.referenced_keys(api), age)
        deleted = set(catalogue.delete_orphans(backend, orphans, lambda: catalogue.referenced_keys(api))
                      if delete else [])  # fmt: skip
    for o in orphans:
        verb = "deleted" if o.key in deleted else ("kept (referenced again)" if delete else "unreferenced")
        typer.echo(f"{o.key}  {o.createdAt}  {_bytes(o.size)}  {verb}")
    total = sum(o.size for o in orphans)
    what = f"deleted {len(deleted)}" if delete else "dry run: --delete removes them"
    typer.echo(f"{len(orphans)} unreferenced bundle(s), {_bytes(total)}; {what}")


@app.command()
def templates() -> None:
    """List the Blueprint templates and their parameters."""
    table = Table(title="templates")
    table.add_column("name")
    table.add_column("parameters (defaults)")
    table.add_column("description")
    for name, t in sorted(TEMPLATES.items()):
        table.add_row(name, _defaults(t.params), t.doc)
    console.print(table)


@app.command()
def ops() -> None:
    """List the graph operations."""
    table = Table(title="ops")
    table.add_column("op")
    table.add_column("inputs")
    table.add_column("parameters (defaults)")
    for name, op in sorted(OPS.items()):
        table.add_row(name, op.arity_text(), _defaults(op.params))
    console.print(table)


kasmina_app = typer.Typer(
    no_args_is_help=True, help="The training side: the Kernel sync sidecar and its injector."
)
app.add_typer(kasmina_app, name="kasmina")
DEFAULT_IMAGE = "ghcr.io/esper-dev/esper:0.1.0"


@kasmina_app.command("sync")
def kasmina_sync() -> None:
    """Run the sidecar: sync the Kernels this pod asked for (ESPER_KERNELS / ESPER_KERNEL_SELECTOR)
    from the store into ESPER_KERNEL_DIR, until SIGTERM. Serves /readyz, /healthz, /metrics."""
    from esper.sidecar.sync import ConfigError, run_sync

    try:
        code = run_sync()
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


@kasmina_app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def kasmina_train(ctx: typer.Context) -> None:
    """The example trainer of a training pod: grows the demo model with the Kernels the sidecar
    delivers (--kernel-dir or ESPER_KERNEL_DIR, --steps, --slots, --metrics-port, --seed)."""
    from esper.demo.trainer import main

    raise typer.Exit(main(list(ctx.args)))


@kasmina_app.command("inject")
def kasmina_inject(
    file: Annotated[Path, typer.Argument(help="Manifest (Pod, Job, PyTorchJob, ...); '-': stdin.")],
    kernels: Annotated[str, typer.Option(help="Comma-separated Kernel names to sync.")] = "",
    selector: Annotated[str, typer.Option(help="Label selector of the Kernels to sync.")] = "",
    blueprint: Annotated[
        str, typer.Option(help="Sync the Kernels this Blueprint serves (follows its rollouts).")
    ] = "",
    image: Annotated[str, typer.Option(help="Sidecar image (carries the esper CLI).")] = DEFAULT_IMAGE,
    store: Annotated[str, typer.Option(help="Store URI; default: taken from each Kernel's status.")] = "",
    kernel_dir: Annotated[
        str, typer.Option(help="Where the shared volume is mounted.")
    ] = "/var/lib/esper/kernels",
    service_account: Annotated[str, typer.Option(help="ServiceAccount to run the pod as.")] = "",
    s3_endpoint: Annotated[str, typer.Option(help="S3 endpoint URL (MinIO); empty: AWS.")] = "",
    s3_region: Annotated[str, typer.Option(help="S3 region.")] = "",
    credentials_secret: Annotated[
        str,
        typer.Option(
            help="Secret with a READ-ONLY AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for the sidecar "
            "(the chart's esper-s3-readonly); empty: workload identity."
        ),
    ] = "",
    trusted_keys: Annotated[
        str, typer.Option(help="ConfigMap of trusted public keys (*.pub); '' to use the image's own.")
    ] = "esper-trusted-keys",
    volume_size_limit: Annotated[str, typer.Option(help="Size limit of the kernel volume.")] = "8Gi",
    target: Annotated[
        str,
        typer.Option(
            help="Sync only these targets' Kernels, comma-separated (e.g. cpu,cpu-avx512); default: all."
        ),
    ] = "",
) -> None:
    """Add the Kasmina sidecar, its shared volume and env to workload manifests; print the result."""
    from esper.contracts.naming import serving_selector
    from esper.sidecar.inject import inject_documents

    if blueprint and selector:
        typer.echo("give --blueprint or --selector, not both", err=True)
        raise typer.Exit(2)
    selector = serving_selector(blueprint) if blueprint else selector
    if not kernels and not selector:
        typer.echo(
            "give --kernels, --blueprint or --selector: which Kernels should the pod receive?", err=True
        )
        raise typer.Exit(2)
    try:
        text = sys.stdin.read() if str(file) == "-" else file.read_text()
    except OSError as exc:
        typer.echo(f"{file}: cannot read: {exc.strerror}", err=True)
        raise typer.Exit(2) from None
    try:
        out = inject_documents(
            text,
            image=image,
            kernels=kernels or None,
            selector=selector or None,
            store_uri=store or None,
            kernel_dir=kernel_dir,
            service_account=service_account or None,
            s3_endpoint=s3_endpoint or None,
            s3_region=s3_region or None,
            credentials_secret=credentials_secret or None,
            trusted_keys_configmap=trusted_keys or None,
            volume_size_limit=volume_size_limit,
            targets=target,
        )
    except (ValueError, yaml.YAMLError) as exc:
        typer.echo(f"{file}: {exc}", err=True)
        raise typer.Exit(1) from None
    sys.stdout.write(out)


def _defaults(model: Any) -> str:
    """`name=default` for optional fields, bare `name` for required ones."""
    parts = []
    for key, field in model.model_fields.items():
        if field.is_required():
            parts.append(key)
        else:
            parts.append(f"{key}={field.get_default(call_default_factory=True)}")
    return ", ".join(parts)


def _numel(shape: list[Any]) -> int:
    n = 1
    for d in shape:
        n *= int(d) if isinstance(d, int) else 1
    return n


def _bytes(size: int) -> str:
    n = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


if __name__ == "__main__":
    app()
