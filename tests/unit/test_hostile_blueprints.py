"""Malformed Blueprints, as a careless or hostile author writes them: every one is refused by `esper
validate` and by the validator the operator runs, with the field and the problem, no traceback, fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from esper.blueprint import BlueprintInvalid
from esper.cli.main import app
from esper.contracts.manifest import ManifestError, load_documents
from esper_operator.plan import plan_blueprint

HEAD = "apiVersion: esper.dev/v1alpha1\nkind: Blueprint\nmetadata:\n  name: hostile\n"
MLP = "spec:\n  template:\n    name: mlp\n"
GRAPH = """spec:
  graph:
    inputs:
      - {{name: x, shape: {shape}}}
    nodes:
      - {{id: out, op: {op}, inputs: [x]{params}}}
    outputs: [out]
{extra}"""


def bp(spec: str = MLP, head: str = HEAD) -> str:
    return head + spec


def graph(shape: str = "[batch, 8]", op: str = "relu", params: str = "", extra: str = "") -> str:
    return bp(GRAPH.format(shape=shape, op=op, params=f", params: {params}" if params else "", extra=extra))


def mlp(params: str = "", extra: str = "") -> str:
    return bp(f"spec:\n  template:\n    name: mlp\n    params: {params or '{}'}\n{extra}")


def alias_bomb() -> str:
    lines = ['      a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        lines.append(f"      a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return bp("spec:\n  template:\n    name: mlp\n    params:\n" + "\n".join(lines) + "\n")


def big_graph(n: int) -> str:
    nodes = [{"id": f"n{i}", "op": "relu", "inputs": ["x" if i == 0 else f"n{i - 1}"]} for i in range(n)]
    spec = {
        "graph": {"inputs": [{"name": "x", "shape": ["batch", 8]}], "nodes": nodes, "outputs": [f"n{n - 1}"]}
    }
    return json.dumps(
        {"apiVersion": "esper.dev/v1alpha1", "kind": "Blueprint", "metadata": {"name": "x"}, "spec": spec}
    )


LONG_NAME = "a" * 254
# (id, manifest, what the CLI must say, whether the operator's validator sees it: the API server and its
# JSON already refuse envelope and syntax mistakes, so the operator checks only the spec)
CORPUS: list[tuple[str, str | bytes, str, bool]] = [
    # the envelope: apiVersion, kind, metadata, top-level fields
    (
        "no-apiversion",
        bp(head=HEAD.replace("apiVersion: esper.dev/v1alpha1\n", "")),
        "apiVersion: required",
        False,
    ),
    (
        "wrong-apiversion",
        bp(head=HEAD.replace("v1alpha1", "v1")),
        "apiVersion: must be esper.dev/v1alpha1",
        False,
    ),
    (
        "wrong-group",
        bp(head=HEAD.replace("esper.dev/", "esper.io/")),
        "apiVersion: must be esper.dev/v1alpha1",
        False,
    ),
    (
        "kind-lowercase",
        bp(head=HEAD.replace("kind: Blueprint", "kind: blueprint")),
        "kind: must be Blueprint",
        False,
    ),
    (
        "kind-camel",
        bp(head=HEAD.replace("kind: Blueprint", "kind: BluePrint")),
        "kind: must be Blueprint",
        False,
    ),
    (
        "kind-plural",
        bp(head=HEAD.replace("kind: Blueprint", "kind: Blueprints")),
        "kind: must be Blueprint",
        False,
    ),
    ("no-kind", bp(head=HEAD.replace("kind: Blueprint\n", "")), "kind: required", False),
    (
        "kind-not-string",
        bp(head=HEAD.replace("kind: Blueprint", "kind: [Blueprint]")),
        "kind: must be Blueprint",
        False,
    ),
    ("duplicate-spec", bp() + MLP, "duplicate key 'spec' (first on line 5)", False),
    (
        "duplicate-param",
        mlp("{features: 8, features: 16}"),
        "spec.template.params: duplicate key 'features'",
        False,
    ),
    ("duplicate-name", HEAD + "  name: again\n" + MLP, "metadata: duplicate key 'name'", False),
    (
        "name-uppercase",
        bp(head=HEAD.replace("hostile", "Hostile")),
        "metadata.name: 'Hostile' is not a valid name",
        False,
    ),
    ("name-too-long", bp(head=HEAD.replace("hostile", LONG_NAME)), "metadata.name: 'aaaa", False),
    (
        "name-underscore",
        bp(head=HEAD.replace("hostile", "my_bp")),
        "metadata.name: 'my_bp' is not a valid name",
        False,
    ),
    ("name-empty", bp(head=HEAD.replace("hostile", "''")), "metadata.name: '' is not a valid name", False),
    (
        "name-number",
        bp(head=HEAD.replace("hostile", "123")),
        "metadata.name: must be a string, got 123",
        False,
    ),
    (
        "no-metadata",
        bp(head="apiVersion: esper.dev/v1alpha1\nkind: Blueprint\n"),
        "metadata: required",
        False,
    ),
    (
        "metadata-string",
        bp(head="apiVersion: esper.dev/v1alpha1\nkind: Blueprint\nmetadata: x\n"),
        "metadata: must be a mapping, got the string 'x'",
        False,
    ),
    (
        "metadata-list",
        bp(head="apiVersion: esper.dev/v1alpha1\nkind: Blueprint\nmetadata: [a]\n"),
        "metadata: must be a mapping, got a list of 1 items",
        False,
    ),
    (
        "label-bool",
        HEAD + "  labels: {team: yes}\n" + MLP,
        "metadata.labels.team: must be a string, got true",
        False,
    ),
    (
        "label-too-long",
        HEAD + f"  labels: {{team: {'x' * 64}}}\n" + MLP,
        "metadata.labels.team: 'xxxx",
        False,
    ),
    (
        "label-bad-key",
        HEAD + "  labels: {'a b': x}\n" + MLP,
        "metadata.labels.a b: invalid key: the name must be",
        False,
    ),
    (
        "annotation-int",
        HEAD + "  annotations: {note: 5}\n" + MLP,
        "metadata.annotations.note: must be a string, got 5",
        False,
    ),
    ("unknown-top-level", bp() + "specs: {}\n", "specs: unknown field 'specs'; did you mean 'spec'?", False),
    ("no-spec", HEAD, "spec: required", False),
    ("spec-list", HEAD + "spec: [1]\n", "spec: must be a mapping, got a list of 1 items", True),
    ("spec-string", HEAD + "spec: mlp\n", "spec: must be a mapping, got the string 'mlp'", True),
    ("document-list", "- a\n- b\n", "(document): must be a mapping", False),
    (
        "unknown-spec-field",
        mlp(extra="  target: cpu\n"),
        "spec.target: unknown field 'target'; did you mean 'targets'?",
        True,
    ),
    (
        "both-sources",
        graph(extra="  template: {name: mlp}\n"),
        "give exactly one of 'template' or 'graph'",
        True,
    ),
    ("no-source", bp("spec:\n  targets: [cpu]\n"), "give exactly one of 'template' or 'graph'", True),
    # loose types: no coercion
    (
        "maxbatch-string",
        mlp(extra="  compile: {maxBatch: '512'}\n"),
        "spec.compile.maxBatch: must be an integer, got the string '512'",
        True,
    ),
    (
        "maxbatch-bool",
        mlp(extra="  compile: {maxBatch: true}\n"),
        "spec.compile.maxBatch: must be an integer, got true",
        True,
    ),
    (
        "maxbatch-float",
        mlp(extra="  compile: {maxBatch: 512.5}\n"),
        "spec.compile.maxBatch: must be an integer, got 512.5",
        True,
    ),
    (
        "maxbatch-huge",
        mlp(extra="  compile: {maxBatch: 100000000000000000000}\n"),
        "spec.compile.maxBatch: must be at most 65536",
        True,
    ),
    (
        "initseed-string",
        mlp(extra="  compile: {initSeed: '0'}\n"),
        "spec.compile.initSeed: must be an integer",
        True,
    ),
    (
        "dim-bool",
        graph(shape="[batch, true]"),
        "spec.graph.inputs[0].shape[1]: must be an integer or 'batch', got true",
        True,
    ),
    (
        "dim-string",
        graph(shape="[batch, '8']"),
        "spec.graph.inputs[0].shape[1]: must be an integer or 'batch'",
        True,
    ),
    (
        "dim-zero",
        graph(shape="[batch, 0]"),
        "spec.graph.inputs[0].shape[1]: must be an integer at least 1 or 'batch'",
        True,
    ),
    (
        "dim-negative",
        graph(shape="[batch, 8, -3]"),
        "spec.graph.inputs[0].shape[2]: must be an integer at least 1",
        True,
    ),
    (
        "dim-batch-not-first",
        graph(shape="[64, batch]"),
        "spec.graph.inputs[0].shape[0]: the first dim must be 'batch'",
        True,
    ),
    (
        "param-string",
        mlp("{features: '64'}"),
        "spec.template.params.features: must be an integer, got the string '64'",
        True,
    ),
    (
        "param-bool",
        graph(op="linear", params="{outFeatures: true}"),
        "spec.graph.nodes[0].params.outFeatures: must be an integer, got true",
        True,
    ),
    (
        "param-nan",
        graph(op="scale", params="{value: .nan}"),
        "spec.graph.nodes[0].params.value: '.nan' is not allowed",
        False,
    ),
    (
        "param-inf",
        graph(op="scale", params="{value: .inf}"),
        "'.inf' is not allowed: numbers must be finite",
        False,
    ),
    (
        "params-many-keys",
        mlp("{" + ", ".join(f"k{i}: 1" for i in range(40)) + "}"),
        "spec.template.params: at most 32 items",
        True,
    ),
    ("params-int-key", mlp("{1: 2}"), "spec.template.params: keys must be strings, got 1", False),
    # bounds on lists and sizes
    (
        "validate-zero",
        mlp(extra="  compile: {validateBatches: [0, 1]}\n"),
        "spec.compile.validateBatches[0]: must be at least 1",
        True,
    ),
    (
        "validate-negative",
        mlp(extra="  compile: {validateBatches: [1, -4]}\n"),
        "spec.compile.validateBatches[1]: must be at least 1, got -4",
        True,
    ),
    (
        "validate-above-max",
        mlp(extra="  compile: {maxBatch: 16, validateBatches: [1, 32]}\n"),
        "spec.compile.validateBatches[1]: 32 is above maxBatch (16)",
        True,
    ),
    (
        "bench-above-max",
        mlp(extra="  compile: {benchmarkBatches: [2048]}\n"),
        "spec.compile.benchmarkBatches[0]: 2048 is above maxBatch (1024)",
        True,
    ),
    (
        "batches-empty",
        mlp(extra="  compile: {validateBatches: []}\n"),
        "spec.compile.validateBatches: at least 1 item, got 0",
        True,
    ),
    (
        "batches-many",
        mlp(extra=f"  compile: {{validateBatches: {list(range(1, 20))}}}\n"),
        "spec.compile.validateBatches: at most 8 items, got 19",
        True,
    ),
    (
        "sample-too-big",
        graph(shape="[batch, 65536, 65536, 65536]"),
        "spec.graph.inputs[0].shape: input 'x' is [batch, 65536",
        True,
    ),
    (
        "batch-too-big",
        graph(shape="[batch, 4096, 4096]", extra="  compile: {maxBatch: 65536}\n"),
        "GiB at maxBatch 65536; at most 32 GiB",
        True,
    ),
    (
        "node-too-big",
        graph(shape="[batch, 1024, 8]", op="linear", params="{outFeatures: 65536}"),
        "spec.graph.nodes[0]: linear 'out' is [batch, 1024, 65536]: 67,108,864 elements per sample",
        True,
    ),
    (
        "shape-mixed",
        graph(shape="[64, batch, 0, -3]"),
        "spec.graph.inputs[0].shape[2]: must be an integer at least 1 or 'batch', got 0",
        True,
    ),
    ("nodes-too-many", big_graph(300), "spec.graph.nodes: at most 256 items, got 300", True),
    # targets
    (
        "targets-string",
        mlp(extra="  targets: cpu\n"),
        "spec.targets: must be a list, got the string 'cpu'",
        True,
    ),
    ("targets-empty", mlp(extra="  targets: []\n"), "spec.targets: at least 1 item, got 0", True),
    (
        "targets-duplicate",
        mlp(extra="  targets: [cpu, cuda-sm90, cpu]\n"),
        "spec.targets[2]: duplicate target 'cpu'",
        True,
    ),
    (
        "target-uppercase",
        mlp(extra="  targets: [CPU]\n"),
        "spec.targets[0]: 'CPU' is not a target: use 'cpu', 'cpu-avx512' or 'cuda-smNN'",
        True,
    ),
    ("target-unknown", mlp(extra="  targets: [gpu]\n"), "spec.targets[0]: 'gpu' is not a target", True),
    (
        "target-arch",
        mlp(extra="  targets: [cuda-sm99]\n"),
        "spec.targets[0]: unsupported CUDA arch 'sm99'",
        True,
    ),
    (
        "target-yaml-bool",
        mlp(extra="  targets: [y]\n"),
        "spec.targets[0]: must be a string, got true (a boolean) (YAML reads",
        True,
    ),
    (
        "template-name-no",
        bp("spec:\n  template:\n    name: no\n"),
        "spec.template.name: must be a string, got false",
        True,
    ),
    (
        "node-id-on",
        graph().replace("id: out", "id: on").replace("outputs: [out]", "outputs: ['on']"),
        "spec.graph.nodes[0].id: must be a string, got true",
        True,
    ),
    # hostile bytes and structures
    (
        "not-utf8",
        HEAD.encode() + b"spec:\n  template:\n    name: ml\xff\n",
        "not UTF-8: byte 0xff at offset",
        False,
    ),
    ("latin1", "metadata:\n  name: caf\u00e9\n".encode("latin-1"), "not UTF-8: byte 0xe9", False),
    ("deep-params", mlp("{x: " + "[" * 500 + "]" * 500 + "}"), "nested deeper than 64 levels", True),
    ("alias-bomb", alias_bomb(), "more than 100,000 values in one document", False),
    (
        "python-tag",
        mlp("{x: !!python/object/apply:os.system [id]}"),
        "is not allowed (plain JSON types only)",
        False,
    ),
    ("tabs", bp("spec:\n\ttemplate: {}\n"), "not valid YAML", False),
    ("nodes-10000", big_graph(10_000), "spec.graph.nodes: at most 256 items, got 10,000", True),
    (
        "string-5mb",
        bp(f"spec:\n  template:\n    name: {'a' * 5_000_000}\n"),
        "spec.template.name: a value of 5,000,000",
        False,
    ),
    (
        "string-3mb",
        bp(f"spec:\n  template:\n    name: {'a' * 3_000_000}\n"),
        "spec.template.name: at most 64 characters, got 3,000,000",
        True,
    ),
    (
        "key-5mib",
        mlp("{" + "k" * (5 * 2**20) + ": 1}"),
        "spec.template.params: a value of 5,242,880 characters",
        False,
    ),
    (
        "key-5mib-block",
        bp("spec:\n  template:\n    " + "k" * (5 * 2**20) + ": 1\n"),
        "spec.template: a value of 5,242,880",
        False,
    ),
    (
        "key-long",
        mlp("{" + "k" * 1000 + ": 1}"),
        "spec.template.params.kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk...: unknown field",
        True,
    ),
]

runner = CliRunner()


# Time goals (each case well under 2 s) are measured by benchmarks/hostile.py; here a generous
# time-out only turns a hang into a failure.
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("case", "manifest", "expected", "operator"), CORPUS, ids=[c[0] for c in CORPUS])
def test_esper_validate_refuses_it_clearly(
    tmp_path: Path, case: str, manifest: str | bytes, expected: str, operator: bool
) -> None:
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(manifest.encode() if isinstance(manifest, str) else manifest)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code in (1, 2), result.output[:2000]
    assert expected in result.output, result.output[:2000]
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert (
        "Traceback" not in result.output
        and "NoneType" not in result.output
        and "got nan" not in result.output
    )
    assert len(result.output) < 4000, result.output[:4000]


def _operator_spec(manifest: str | bytes) -> Any:
    """The spec as the operator gets it: what the API server stored from the same document, as JSON."""
    try:
        docs = load_documents(manifest)
    except ManifestError:
        docs = None
    if docs is None:  # the reader refused: hand the operator the same structure, built by hand
        return {"template": {"name": "mlp", "params": {"x": json.loads("[" * 500 + "]" * 500)}}}
    return json.loads(json.dumps(docs[0]["spec"]))


OPERATOR_CASES = [c for c in CORPUS if c[3]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("case", "manifest", "expected", "operator"), OPERATOR_CASES, ids=[c[0] for c in OPERATOR_CASES]
)
def test_the_operators_validator_refuses_it_too(
    case: str, manifest: str | bytes, expected: str, operator: bool
) -> None:
    spec = _operator_spec(manifest)
    with pytest.raises(BlueprintInvalid) as info:
        plan_blueprint("hostile", spec, torch_version="2.13.0")
    text = str(info.value)
    assert expected.replace("(document): ", "") in text or expected in text, text[:2000]
    assert len(text) < 4000


def test_the_corpus_covers_sixty_cases() -> None:
    assert len(CORPUS) >= 60 and len({c[0] for c in CORPUS}) == len(CORPUS)


def test_a_clearly_different_kind_in_a_manifest_is_skipped_with_a_note(tmp_path: Path) -> None:
    path = tmp_path / "mixed.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n" + bp())
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert f"{path}#1 (hostile): ok, digest " in result.output
    assert f"{path}#0: kind ConfigMap is not a Blueprint: skipped" in result.output


def test_a_valid_manifest_still_validates(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        mlp(
            "{features: 16}",
            extra="  targets: [cpu, cuda-sm90]\n  compile: {maxBatch: 64, validateBatches: [1, 64]}\n",
        )
    )
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and "(hostile): ok, digest" in result.output, result.output


@pytest.mark.parametrize(
    ("case", "manifest", "expected"),
    [
        ("not-utf8", b"spec: {template: {name: ml\xff}}", "not UTF-8: byte 0xff at offset 26"),
        (
            "duplicate",
            "spec: {template: {name: mlp}}\nspec: {}\n",
            "line 2: duplicate key 'spec' (first on line 1)",
        ),
        ("alias-bomb", alias_bomb(), "more than 100,000 values in one document"),
        (
            "strict-int",
            mlp(extra="  compile: {maxBatch: '512'}\n"),
            "spec.compile.maxBatch: must be an integer",
        ),
        (
            "near-kind",
            bp(head=HEAD.replace("kind: Blueprint", "kind: blueprint")),
            "kind is 'blueprint', expected Blueprint",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 20 else "",
)
def test_the_compile_job_refuses_it_with_exit_65(
    tmp_path: Path, case: str, manifest: str | bytes, expected: str
) -> None:
    from esper.contracts.job import ExitCode
    from esper.tezzeret.entrypoint import load_spec, plan
    from esper.tezzeret.exitcodes import InvalidBlueprint

    path = tmp_path / f"{case}.yaml"
    path.write_bytes(manifest.encode() if isinstance(manifest, str) else manifest)
    with pytest.raises(InvalidBlueprint) as info:
        plan(load_spec(str(path)), "cpu", None)
    assert info.value.code == ExitCode.INVALID_BLUEPRINT
    assert expected in str(info.value) and len(str(info.value)) < 1000, str(info.value)[:1000]


@pytest.mark.parametrize("template", ["transformer-block", "conv-block", "residual-mlp"])
def test_the_compile_job_reads_the_operators_request_to_the_same_key(template: str) -> None:
    """The operator's JSON (floats such as eps=1e-05 included) means the same to the compile Job."""
    from esper.contracts.job import REQUEST_ENV
    from esper.tezzeret.entrypoint import load_work, parser, plan
    from esper_operator.jobs import compile_request

    planned = plan_blueprint("b", {"template": {"name": template}}, torch_version="2.13.0").kernels[0]
    request = compile_request(planned.spec).to_env()
    assert "e-05" in request or template == "residual-mlp"  # a float JSON writes with an exponent
    work = load_work(parser().parse_args(["--store", "x"]), {REQUEST_ENV: request})
    assert plan(work.spec, work.target, None).ir_digest == planned.spec.irDigest


def test_esper_compile_refuses_a_near_miss_kind_before_compiling(tmp_path: Path) -> None:
    path = tmp_path / "bp.yaml"
    path.write_text(bp(head=HEAD.replace("kind: Blueprint", "kind: blueprint")))
    result = runner.invoke(app, ["compile", str(path), "--store", str(tmp_path / "store")])
    assert result.exit_code == 2, result.output
    assert (
        f"{path} (hostile): kind: must be Blueprint, got the string 'blueprint' (kinds are case-sensitive)"
        in result.output
    )
    assert not (tmp_path / "store").exists()


def test_problems_are_capped_so_a_status_message_stays_small() -> None:
    nodes = [{"id": f"n{i}", "op": f"bogus{i}", "inputs": ["x"]} for i in range(200)]
    spec = {"graph": {"inputs": [{"name": "x", "shape": ["batch", 8]}], "nodes": nodes, "outputs": ["n0"]}}
    with pytest.raises(BlueprintInvalid) as info:
        plan_blueprint("many", spec, torch_version="2.13.0")
    problems = info.value.problems
    assert (
        len(problems) == 51 and str(problems[-1]) == "spec: ... and 349 more problems"
    )  # 200 unknown ops, 199 unused nodes
    assert str(problems[0]) == "spec.graph.nodes[0].op: unknown op 'bogus0'"
