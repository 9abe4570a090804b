"""The `esper` command line: exit codes and the messages users read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from esper.cli.main import app

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def test_validate_accepts_the_examples() -> None:
    good = [p for p in sorted(EXAMPLES.glob("*.yaml")) if p.name != "invalid-blueprint.yaml"]
    blueprints = [p for p in good if "kind: Blueprint" in p.read_text()]
    result = run("validate", *map(str, good))
    assert result.exit_code == 0, result.output
    assert result.output.count(": ok, digest ") == len(blueprints) >= 5
    assert (
        "training-pod.yaml: no Blueprint in this file (Pod, RoleBinding, ServiceAccount): skipped"
        in result.output
    )


def test_validate_prints_one_line_per_problem_with_file_and_path() -> None:
    result = run("validate", str(EXAMPLES / "invalid-blueprint.yaml"))
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if "invalid-blueprint.yaml" in line]
    assert len(lines) == 3
    assert any(
        line.endswith("spec.graph.nodes[1].op: unknown op 'rleu'; did you mean 'relu'?") for line in lines
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a: [unclosed", "line 2: not valid YAML: did not find expected ',' or ']'"),
        ("", "no documents"),
        ("kind: Pod\nmetadata: {name: x}\n", "no Blueprint in this file (Pod): skipped"),
    ],
)
def test_validate_unreadable_input_exits_2(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bp.yaml"
    path.write_text(content)
    result = run("validate", str(path))
    assert result.exit_code == 2 and message in result.output


def test_validate_missing_file_exits_2(tmp_path: Path) -> None:
    result = run("validate", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "cannot read" in result.output


def test_validate_a_bare_spec_and_multiple_documents(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(
        "template: {name: mlp, params: {features: 8, hidden: 16}}\n---\n"
        "template: {name: lora-adapter, params: {features: 8, rank: 99}}\n"
    )
    result = run("validate", str(path))
    assert result.exit_code == 1
    assert f"{path}#0: ok" in result.output
    assert f"{path}#1: spec.template.params" in result.output


def test_compile_refuses_an_invalid_blueprint_without_compiling(tmp_path: Path) -> None:
    result = run("compile", str(EXAMPLES / "invalid-blueprint.yaml"), "--store", str(tmp_path / "store"))
    assert result.exit_code == 65
    assert "broken-mlp (cpu): InvalidBlueprint" in result.output
    assert not list((tmp_path / "store").glob("kernels/*"))


def test_compile_refuses_an_unsupported_target(tmp_path: Path) -> None:
    result = run(
        "compile", str(EXAMPLES / "blueprint.yaml"), "--target", "cuda-sm90", "--store", str(tmp_path)
    )
    assert result.exit_code == 66


def test_kernels_on_a_missing_store_exits_2(tmp_path: Path) -> None:
    result = run("kernels", "--store", str(tmp_path / "missing"))
    assert result.exit_code == 2 and "no such store directory" in result.output


def test_kernels_on_an_empty_store_lists_nothing(tmp_path: Path) -> None:
    result = run("kernels", "--store", str(tmp_path), "--json")
    assert result.exit_code == 0 and result.output.strip() == "[]"


def test_templates_and_ops_list_everything() -> None:
    from esper.blueprint import OPS, TEMPLATES

    templates, ops = run("templates"), run("ops")
    assert templates.exit_code == ops.exit_code == 0
    for name in TEMPLATES:
        assert name[:8] in templates.output
    for name in OPS:
        assert name[:8] in ops.output


def test_inject_needs_a_choice_of_kernels(tmp_path: Path) -> None:
    pod = tmp_path / "pod.yaml"
    pod.write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: i}]}\n"
    )
    assert run("kasmina", "inject", str(pod)).exit_code == 2
    result = run("kasmina", "inject", str(pod), "--kernels", "cpu-0123")
    assert (
        result.exit_code == 0
        and "esper-kasmina" in result.output
        and "restartPolicy: Always" in result.output
    )
    served = yaml.safe_load(run("kasmina", "inject", str(pod), "--blueprint", "mlp").output)
    sidecar = next(c for c in served["spec"]["initContainers"] if c["name"] == "esper-kasmina")
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["ESPER_KERNEL_SELECTOR"] == "blueprint.esper.dev/mlp=serving"
    both = run("kasmina", "inject", str(pod), "--blueprint", "mlp", "--selector", "a=b")
    assert both.exit_code == 2 and "not both" in both.output
    bad = tmp_path / "cm.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {}\n")
    assert run("kasmina", "inject", str(bad), "--kernels", "x").output.strip().startswith("apiVersion")


def test_kernels_reports_the_same_bundle_size_as_the_store(tmp_path: Path) -> None:
    """Data files plus manifest.json, as the Kernel's status.artifact.size has it."""
    from esper.storage import open_store
    from tests.support.s3 import make_fake_bundle

    key, _ = make_fake_bundle(tmp_path / "bundle", size=1000)
    files = [p for p in (tmp_path / "bundle").iterdir() if p.name != "manifest.sig"]  # signs, not counted
    on_disk = sum(p.stat().st_size for p in files)
    ref = open_store(str(tmp_path / "store")).put_bundle(key, tmp_path / "bundle")
    result = run("kernels", "--store", str(tmp_path / "store"), "--json")
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output)
    assert row["key"] == key and row["size"] == ref.size == on_disk > 3000


def _fake_bundle(store: Path, key: str, causal: bool | None, blueprint: str | None) -> str:
    """A bundle directory holding only its manifest (enough for `esper kernels`); returns its sha256."""
    import hashlib

    from esper.artifact import IOSpec, Manifest
    from esper.contracts.common import Toolchain

    m = Manifest(
        key=key, irDigest="d" * 64, target="cpu", toolchain=Toolchain(torch="2.13.0", capability="cpu-avx2"),
        graph={}, inputs=[IOSpec(name="x", shape=["batch", 16, 64])],
        outputs=[IOSpec(name="add", shape=["batch", 16, 64])], blueprint=blueprint,
        mixesPositions=None if causal is None else True, causal=causal,
    )  # fmt: skip
    d = store / "kernels" / key
    d.mkdir(parents=True)
    data = m.to_bytes()
    (d / "manifest.json").write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_kernels_shows_blueprint_shapes_causality_and_manifest_sha(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from rich.console import Console

    import esper.cli.main

    shas = {
        "a" * 64: _fake_bundle(tmp_path, "a" * 64, True, "causal-attn"),
        "b" * 64: _fake_bundle(tmp_path, "b" * 64, False, "attn"),
        "c" * 64: _fake_bundle(tmp_path, "c" * 64, None, None),
    }
    rows = json.loads(run("kernels", "--store", str(tmp_path), "--json").output)
    assert [(r["key"][0], r["blueprint"], r["causal"]) for r in rows] == [
        ("a", "causal-attn", True), ("b", "attn", False), ("c", None, None),
    ]  # fmt: skip
    assert all(r["manifestSha256"] == shas[r["key"]] for r in rows)
    assert rows[0]["inputs"] == [["batch", 16, 64]] and rows[0]["outputs"] == [["batch", 16, 64]]
    causal = json.loads(run("kernels", "--store", str(tmp_path), "--json", "--causal").output)
    assert [r["key"][0] for r in causal] == ["a"]
    non_causal = json.loads(run("kernels", "--store", str(tmp_path), "--json", "--non-causal").output)
    assert [r["key"][0] for r in non_causal] == ["b"]
    monkeypatch.setattr(esper.cli.main, "console", Console(width=220))
    table = run("kernels", "--store", str(tmp_path)).output
    assert "causal-attn" in table and "(batch, 16, 64) -> (batch, 16, 64)" in table
    assert shas["a" * 64][:16] in table
