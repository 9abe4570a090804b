"""Validation: every kind of mistake is reported at the path of the field at fault, all in one pass."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from esper.blueprint import BlueprintInvalid, BlueprintSource, Problem, expand, validate_source
from esper.blueprint.ir import Graph, TemplateRef
from esper.blueprint.templates import TEMPLATES
from esper.blueprint.validate import (
    analyze,
    expand_template,
    fill_defaults,
    output_shapes,
    param_count,
    parse_source,
)
from esper.contracts import Blueprint, BlueprintSpec
from esper.contracts.validation import validate_blueprint_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def node(id_: str, op: str, *inputs: str, **params: Any) -> dict[str, Any]:
    return {"id": id_, "op": op, "inputs": list(inputs), "params": params}


def graph(
    *nodes: dict[str, Any],
    shape: list[Any] | None = None,
    outputs: list[str] | None = None,
    inputs: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A one-input graph (x: [batch, 8] unless told) whose output is the last node."""
    return {
        "graph": {
            "inputs": inputs or [{"name": "x", "shape": shape or ["batch", 8]}],
            "nodes": list(nodes),
            "outputs": outputs or [nodes[-1]["id"]],
            **extra,
        }
    }


def template(name: str, **params: Any) -> dict[str, Any]:
    return {"template": {"name": name, "params": params}}


N = "spec.graph.nodes"
T = "spec.template.params"

# (case id, source, expected path, expected message substring)
INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    ("unknown-op", graph(node("y", "lienar", "x", outFeatures=4)), f"{N}[0].op", "did you mean 'linear'"),
    (
        "unknown-param",
        graph(node("y", "linear", "x", outFeature=4)),
        f"{N}[0].params.outFeature",
        "did you mean 'outFeatures'",
    ),
    ("missing-param", graph(node("y", "linear", "x")), f"{N}[0].params.outFeatures", "required"),
    (
        "param-too-small",
        graph(node("y", "linear", "x", outFeatures=0)),
        f"{N}[0].params.outFeatures",
        "must be at least 1, got 0",
    ),
    (
        "param-too-large",
        graph(node("y", "linear", "x", outFeatures=70000)),
        f"{N}[0].params.outFeatures",
        "must be at most 65536, got 70000",
    ),
    (
        "param-wrong-type",
        graph(node("y", "linear", "x", outFeatures="64")),
        f"{N}[0].params.outFeatures",
        "must be an integer, got the string '64'",
    ),
    ("dropout-p-1", graph(node("y", "dropout", "x", p=1.0)), f"{N}[0].params.p", "less than 1"),
    ("scale-nan", graph(node("y", "scale", "x", value=math.nan)), f"{N}[0].params.value", "finite"),
    (
        "kernel-too-big",
        graph(node("y", "conv1d", "x", outChannels=4, kernelSize=16), shape=["batch", 4, 32]),
        f"{N}[0].params.kernelSize",
        "must be at most 15, got 16",
    ),
    (
        "same-needs-stride-1",
        graph(node("y", "conv1d", "x", outChannels=4, padding="same", stride=2), shape=["batch", 4, 32]),
        f"{N}[0].params.padding",
        "'same' needs stride 1",
    ),
    (
        "conv-groups",
        graph(node("y", "conv1d", "x", outChannels=6, groups=3), shape=["batch", 4, 32]),
        f"{N}[0].params.groups",
        "must divide the input channels 4",
    ),
    ("conv-rank", graph(node("y", "conv2d", "x", outChannels=4)), f"{N}[0].inputs", "rank-4"),
    (
        "pool-too-big",
        graph(node("y", "max_pool2d", "x", kernelSize=5), shape=["batch", 2, 4, 4]),
        f"{N}[0].params.kernelSize",
        "larger than the padded input",
    ),
    ("arity", graph(node("y", "add", "x")), f"{N}[0].inputs", "takes 2 inputs, got 1"),
    ("dangling-ref", graph(node("y", "relu", "z")), f"{N}[0].inputs[0]", "unknown input 'z'"),
    (
        "duplicate-node-id",
        graph(node("y", "relu", "x"), node("y", "tanh", "x")),
        f"{N}[1].id",
        "duplicate id 'y'",
    ),
    ("id-shadows-input", graph(node("x", "relu", "x")), f"{N}[0].id", "duplicate id 'x'"),
    ("reserved-id", graph(node("forward", "relu", "x")), f"{N}[0].id", "reserved"),
    ("bad-id", graph(node("Fc1", "relu", "x")), f"{N}[0].id", "'Fc1' must start with a lowercase letter"),
    (
        "cycle",
        graph(node("a", "add", "x", "b"), node("b", "relu", "a"), outputs=["a"]),
        f"{N}[0].inputs",
        "cycle: a -> b -> a",
    ),
    ("self-loop", graph(node("a", "relu", "a")), f"{N}[0].inputs", "cycle: a -> a"),
    (
        "unknown-output",
        graph(node("y", "relu", "x"), outputs=["yy"]),
        "spec.graph.outputs[0]",
        "unknown output 'yy'; did you mean 'y'",
    ),
    (
        "duplicate-output",
        graph(node("y", "relu", "x"), outputs=["y", "y"]),
        "spec.graph.outputs[1]",
        "already an output",
    ),
    (
        "broadcast",
        graph(node("a", "linear", "x", outFeatures=4), node("y", "add", "x", "a")),
        f"{N}[1].inputs",
        "do not broadcast: [batch, 8] and [batch, 4]",
    ),
    (
        "matmul-inner",
        graph(node("y", "matmul", "x", "x"), shape=["batch", 2, 3]),
        f"{N}[0].inputs",
        "inner sizes differ",
    ),
    ("attention-rank", graph(node("y", "multihead_attention", "x")), f"{N}[0].inputs", "rank-3"),
    (
        "attention-heads",
        graph(node("y", "multihead_attention", "x", heads=3), shape=["batch", 4, 8]),
        f"{N}[0].params.heads",
        "must divide the embed size 8",
    ),
    (
        "reshape-size",
        graph(node("y", "reshape", "x", shape=[3, 3])),
        f"{N}[0].params.shape",
        "cannot reshape",
    ),
    (
        "reshape-two-infer",
        graph(node("y", "reshape", "x", shape=[-1, -1])),
        f"{N}[0].params.shape",
        "at most one",
    ),
    ("softmax-batch-dim", graph(node("y", "softmax", "x", dim=0)), f"{N}[0].params.dim", "batch dim"),
    ("softmax-dim-range", graph(node("y", "softmax", "x", dim=3)), f"{N}[0].params.dim", "out of range"),
    ("flatten-batch", graph(node("y", "flatten", "x", startDim=-2)), f"{N}[0].params.startDim", "batch dim"),
    ("mean-twice", graph(node("y", "mean", "x", dims=[1, -1])), f"{N}[0].params.dims", "same dim twice"),
    (
        "batch-not-first",
        graph(node("y", "relu", "x"), shape=[8, "batch"]),
        "spec.graph.inputs[0].shape[0]",
        "first dim must be 'batch'",
    ),
    (
        "batch-twice",
        graph(node("y", "relu", "x"), shape=["batch", "batch"]),
        "spec.graph.inputs[0].shape[1]",
        "only be the first dim",
    ),
    (
        "zero-dim",
        graph(node("y", "relu", "x"), shape=["batch", 0]),
        "spec.graph.inputs[0].shape[1]",
        "must be an integer at least 1 or 'batch', got 0",
    ),
    (
        "huge-dim",
        graph(node("y", "relu", "x"), shape=["batch", 70000]),
        "spec.graph.inputs[0].shape[1]",
        "must be an integer at most 65536 or 'batch', got 70000",
    ),
    ("rank-1", graph(node("y", "relu", "x"), shape=["batch"]), "spec.graph.inputs[0].shape", "at least 2"),
    (
        "output-dim-too-big",
        graph(node("y", "concat", "x", "x"), shape=["batch", 40000]),
        f"{N}[0]",
        "at most 65536",
    ),
    (
        "too-many-params",
        graph(node("y", "linear", "x", outFeatures=65536), shape=["batch", 65536]),
        "spec.graph",
        "the limit is 50,000,000",
    ),
    (
        "unused-node",
        graph(node("y", "relu", "x"), node("z", "tanh", "x"), outputs=["y"]),
        f"{N}[1]",
        "does not reach any output",
    ),
    (
        "unused-input",
        graph(
            node("y", "relu", "x"),
            inputs=[{"name": "x", "shape": ["batch", 8]}, {"name": "w", "shape": ["batch", 8]}],
        ),
        "spec.graph.inputs[1]",
        "input 'w' is not used",
    ),
    (
        "float16-batch-norm",
        graph(node("y", "batch_norm", "x"), dtype="float16"),
        f"{N}[0].op",
        "does not support float16",
    ),
    ("bad-dtype", graph(node("y", "relu", "x"), dtype="int8"), "spec.graph.dtype", "float32"),
    (
        "unknown-node-field",
        graph({"id": "y", "opp": "relu", "op": "relu", "inputs": ["x"]}),
        f"{N}[0].opp",
        "unknown field 'opp'",
    ),
    (
        "too-many-nodes",
        graph(*[node(f"n{i}", "relu", "x") for i in range(257)]),
        "spec.graph.nodes",
        "at most 256",
    ),
    ("neither", {}, "spec", "exactly one"),
    ("both", {**template("mlp"), **graph(node("y", "relu", "x"))}, "spec", "exactly one"),
    ("unknown-template", template("residual_mlp"), "spec.template.name", "did you mean 'residual-mlp'"),
    ("template-param-bound", template("lora-adapter", rank=0), f"{T}.rank", "must be at least 1, got 0"),
    ("template-unknown-param", template("mlp", featurs=8), f"{T}.featurs", "did you mean 'features'"),
    ("template-cross-field", template("attention-block", embed=64, heads=5), f"{T}.heads", "must divide"),
    ("template-even-kernel", template("conv-block", kernelSize=4), f"{T}.kernelSize", "must be odd"),
    (
        "template-too-big",
        template("residual-mlp", features=65536, hidden=65536, blocks=16),
        T,
        "the limit is 50,000,000",
    ),
    (
        "duplicate-targets",
        {**template("mlp"), "targets": ["cpu", "cpu"]},
        "spec.targets[1]",
        "duplicate target 'cpu'",
    ),
    (
        "bad-target",
        {**template("mlp"), "targets": ["gpu"]},
        "spec.targets[0]",
        "'gpu' is not a target: use 'cpu', 'cpu-avx512' or 'cuda-smNN'",
    ),
    (
        "bad-compile",
        {**template("mlp"), "compile": {"maxBatch": 0}},
        "spec.compile.maxBatch",
        "must be at least 1, got 0",
    ),
]


def problems_of(source: Any) -> list[Problem]:
    with pytest.raises(BlueprintInvalid) as info:
        validate_blueprint_spec(source)
    assert info.value.problems, "BlueprintInvalid without problems"
    return info.value.problems


def test_table_is_large_and_ids_unique() -> None:
    assert len(INVALID) >= 30
    assert len({c[0] for c in INVALID}) == len(INVALID)


@pytest.mark.parametrize(
    ("source", "path", "substring"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_blueprint_is_reported_at_its_path(source: dict[str, Any], path: str, substring: str) -> None:
    problems = problems_of(source)
    hits = [p for p in problems if p.path == path and substring in p.message]
    assert hits, f"no problem at {path} containing {substring!r}; got:\n" + "\n".join(map(str, problems))


def test_all_problems_in_one_pass() -> None:
    source = graph(
        node("a", "lienar", "x", outFeatures=4),
        node("b", "linear", "x", outFeatures=0),
        node("c", "add", "a", "nope"),
        node("d", "add", "x", "x", "x"),
        outputs=["c", "d", "missing"],
    )
    paths = {p.path for p in problems_of(source)}
    assert {
        f"{N}[0].op",
        f"{N}[1].params.outFeatures",
        f"{N}[2].inputs[1]",
        f"{N}[3].inputs",
        "spec.graph.outputs[2]",
    } <= paths


def test_str_has_one_line_per_problem_and_order_follows_the_document() -> None:
    chain = [node(f"n{i}", "relu", f"n{i - 1}" if i else "x") for i in range(11)]
    src = graph(*chain)
    src["graph"]["nodes"][2]["op"] = "rleu"
    src["graph"]["nodes"][10]["op"] = "tnah"
    err = problems_of(src)
    lines = str(BlueprintInvalid(err)).splitlines()
    assert lines[0] == f"{N}[2].op: unknown op 'rleu'; did you mean 'relu'?"
    assert lines[1].startswith(f"{N}[10].op: unknown op 'tnah'")
    assert len(lines) == len(err)


def test_prefix_is_configurable() -> None:
    with pytest.raises(BlueprintInvalid) as err:
        validate_source(template("mlp", features=0), path_prefix="b.spec")
    assert [p.path for p in err.value.problems] == ["b.spec.template.params.features"]


def test_accepts_models_as_well_as_dicts() -> None:
    src = BlueprintSource.model_validate(template("bottleneck", features=32))
    spec = BlueprintSpec.model_validate({**template("bottleneck", features=32), "targets": ["cpu"]})
    assert validate_source(src) == validate_source(spec) == validate_source(spec.model_dump())


def test_expand_fills_defaults_without_shape_checks() -> None:
    g = expand(graph(node("y", "linear", "x", outFeatures=4)))
    assert g.nodes[0].params == {"outFeatures": 4, "bias": True, "init": "default"}
    with pytest.raises(BlueprintInvalid):
        expand(template("nope"))


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize(
    "path",
    sorted(
        p.name
        for p in EXAMPLES.glob("*.yaml")
        if "invalid" not in p.name and "kind: Blueprint" in p.read_text()
    ),
)
def test_example_validates(path: str) -> None:
    doc = load(EXAMPLES / path)
    Blueprint.model_validate(doc)  # the resource itself is well formed
    graph_ = validate_source(doc["spec"])
    assert len(graph_.inputs) == 1  # seeds read one activation


def test_examples_include_the_readme_seed() -> None:
    spec = load(EXAMPLES / "blueprint.yaml")["spec"]
    assert spec["template"]["name"] == "residual-mlp" and spec["template"]["params"]["features"] == 64


def test_invalid_example_reports_its_problems() -> None:
    doc = load(EXAMPLES / "invalid-blueprint.yaml")
    Blueprint.model_validate(doc)  # the API server accepts it; only deep validation rejects it
    problems = problems_of(doc["spec"])
    assert [str(p) for p in problems] == [
        "spec.graph.nodes[0].params.outFeatures: must be at least 1, got 0",
        "spec.graph.nodes[1].op: unknown op 'rleu'; did you mean 'relu'?",
        "spec.graph.nodes[2].inputs[0]: unknown input 'hiden'; did you mean 'hidden'?",
    ]


def test_the_ir_never_imports_the_contracts() -> None:
    """One-way layers: the contracts call the IR's validation, never the other way round (not even lazily)."""
    import ast

    package = Path(__file__).resolve().parents[2] / "esper" / "blueprint"
    upward = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            upward += [
                f"{path.name}: {n}"
                for n in names
                if n.startswith(("esper.", "esper_operator")) and not n.startswith("esper.blueprint")
            ]
    assert upward == []


@pytest.mark.parametrize("op", ["linear", "layer_norm", "rms_norm"])
def test_last_dim_ops_refuse_an_input_with_only_the_batch_dim(op: str) -> None:
    """`mean` of [batch, 8] leaves [batch]; a norm or linear over it would mix samples."""
    params = {"outFeatures": 4} if op == "linear" else {}
    graph = {
        "inputs": [{"name": "x", "shape": ["batch", 8]}],
        "nodes": [
            {"id": "m", "op": "mean", "inputs": ["x"], "params": {}},
            {"id": "n", "op": op, "inputs": ["m"], "params": params},
        ],
        "outputs": ["n"],
    }
    with pytest.raises(BlueprintInvalid) as err:
        validate_source({"graph": graph})
    [problem] = err.value.problems
    assert problem.path == "spec.graph.nodes[1].inputs"
    assert "only the batch dim" in problem.message


def test_every_duplicate_id_points_at_the_first_use() -> None:
    src = graph(
        node("x", "relu", "x"), node("a", "relu", "x"), node("a", "relu", "a"), node("a", "relu", "a")
    )
    dups = [(p.path, p.message) for p in problems_of(src) if "duplicate" in p.message]
    assert dups == [
        (f"{N}[0].id", "duplicate id 'x' (also spec.graph.inputs[0].name)"),
        (f"{N}[2].id", "duplicate id 'a' (also spec.graph.nodes[1].id)"),
        (f"{N}[3].id", "duplicate id 'a' (also spec.graph.nodes[1].id)"),
    ]


LIENAR = "unknown op 'lienar'; did you mean 'linear'?"
KNOWN = f"(known: {', '.join(sorted(TEMPLATES))})"  # the list grows with the templates


def _problems(call: Any) -> list[tuple[str, str]]:
    with pytest.raises(BlueprintInvalid) as info:
        call()
    return [(p.path, p.message) for p in info.value.problems]


def test_expand_reports_at_the_source_path() -> None:
    bad = graph(node("y", "lienar", "x"))
    assert _problems(lambda: expand(bad)) == [(f"{N}[0].op", LIENAR)]
    assert _problems(lambda: expand(bad, path_prefix="b.spec")) == [("b.spec.graph.nodes[0].op", LIENAR)]
    assert _problems(lambda: expand(5, path_prefix="b.spec")) == [("b.spec", "must be a mapping, got 5")]
    assert _problems(lambda: expand(template("nope"), path_prefix="b.spec")) == [
        ("b.spec.template.name", f"unknown template 'nope' {KNOWN}")
    ]
    assert _problems(lambda: expand(template("mpl"))) == [
        ("spec.template.name", f"unknown template 'mpl'; did you mean 'mlp'? {KNOWN}")
    ]
    assert _problems(lambda: expand_template(TemplateRef(name="nope"))) == [
        ("spec.template.name", f"unknown template 'nope' {KNOWN}")
    ]


def test_shapes_and_parameter_counts_of_an_invalid_graph_are_refused() -> None:
    bad = Graph.model_validate(graph(node("y", "lienar", "x"))["graph"])
    assert _problems(lambda: output_shapes(bad)) == [("graph.nodes[0].op", LIENAR)]
    assert _problems(lambda: param_count(bad)) == [("graph.nodes[0].op", LIENAR)]
    good = Graph.model_validate(graph(node("y", "linear", "x", outFeatures=4))["graph"])
    assert (output_shapes(good), param_count(good)) == ([("batch", 4)], 8 * 4 + 4)


def _relu_on(shape: list[Any], dtype: str = "float32") -> dict[str, Any]:
    return graph(node("y", "relu", "x"), shape=shape, dtype=dtype)


def test_the_activation_bounds_are_inclusive_and_count_the_dtype() -> None:
    at_limit = ["batch", 4096, 4096]  # 2**24 elements; 2**35 bytes at maxBatch 1024 in 16-bit floats
    for dtype in ("float16", "bfloat16"):
        validate_source(_relu_on(at_limit, dtype))
    validate_source(_relu_on(at_limit), max_batch=512)  # float32: 2**35 bytes at 512
    over = (
        "input 'x' is [batch, 4096, 4096]: 32.1 GiB at maxBatch 513; "
        "at most 32 GiB (lower compile.maxBatch or the sizes)"
    )
    assert _problems(lambda: validate_source(_relu_on(at_limit), max_batch=513)) == [
        ("spec.graph.inputs[0].shape", over)
    ]


def test_a_sample_too_large_is_one_problem_and_stops_there() -> None:
    """Its value is never computed, so nothing downstream is checked against it."""
    big = "input 'x' is [batch, 4097, 4096]: 16,781,312 elements per sample; at most 16,777,216"
    assert _problems(lambda: validate_source(_relu_on(["batch", 4097, 4096]), max_batch=1)) == [
        ("spec.graph.inputs[0].shape", big)
    ]


def test_a_template_that_expands_too_large_is_reported_at_its_params() -> None:
    src = template("attention-block", embed=4096, heads=4, seq=4096)
    assert _problems(lambda: validate_source(src)) == [
        (
            f"{T}",
            "expands to a graph where inputs[0].shape: input 'x' is [batch, 4096, 4096]: "
            "64.0 GiB at maxBatch 1024; at most 32 GiB (lower compile.maxBatch or the sizes)",
        )
    ]


def test_batch_dim_problems_say_what_was_found() -> None:
    assert _problems(lambda: validate_source(_relu_on([8, "batch"]))) == [
        ("spec.graph.inputs[0].shape[0]", "the first dim must be 'batch', got 8"),
        ("spec.graph.inputs[0].shape[1]", "'batch' may only be the first dim"),
    ]
    assert _problems(lambda: validate_source(_relu_on(["batch", 4, "batch"]))) == [
        ("spec.graph.inputs[0].shape[2]", "'batch' may only be the first dim"),
    ]


def test_the_graph_limits_are_inclusive() -> None:
    validate_source(graph(node("y", "linear", "x", outFeatures=10000, bias=False), shape=["batch", 5000]))
    assert _problems(
        lambda: validate_source(graph(node("y", "linear", "x", outFeatures=10000), shape=["batch", 5000]))
    ) == [
        (
            "spec.graph",
            "50,010,000 parameters; the limit is 50,000,000",
        )  # 5000 * 10000 weights + 10000 biases
    ]
    validate_source(graph(node("y", "concat", "x", "x"), shape=["batch", 32768]))  # 65536 wide: the most
    assert _problems(
        lambda: validate_source(graph(node("y", "concat", "x", "x"), shape=["batch", 32769]))
    ) == [(f"{N}[0]", "concat 'y' gives [batch, 65538]; every dim must be at most 65536")]
    chain = [node(f"n{i}", "relu", f"n{i - 1}" if i else "x") for i in range(257)]
    validate_source(graph(*chain[:256]))
    assert _problems(lambda: validate_source(graph(*chain))) == [(f"{N}", "at most 256 items, got 257")]


def test_duplicate_inputs_and_the_widest_input() -> None:
    two = graph(node("y", "add", "x", "x"), inputs=[{"name": "x", "shape": ["batch", 8]}] * 2)
    assert _problems(lambda: validate_source(two)) == [
        ("spec.graph.inputs[1].name", "duplicate id 'x' (also spec.graph.inputs[0].name)")
    ]
    validate_source(_relu_on(["batch", 65536]))  # MAX_DIM itself is allowed


def test_a_cycle_is_reported_at_its_first_node_in_the_document() -> None:
    src = graph(
        node("b", "add", "x", "a"), node("a", "relu", "b"), outputs=["b"]
    )  # b comes first, a sorts first
    assert _problems(lambda: validate_source(src)) == [(f"{N}[0].inputs", "cycle: a -> b -> a")]


def test_shape_inference_goes_on_past_every_kind_of_bad_node() -> None:
    inner = (
        "inner sizes differ: [batch, 2, 3] @ [batch, 2, 3] (3 != 2) (inputs: [batch, 2, 3], [batch, 2, 3])"
    )
    src = graph(
        node("a", "lienar", "x"),
        node("b", "add", "x"),
        node("c", "matmul", "x", "x"),
        node("d", "matmul", "x", "x"),
        shape=["batch", 2, 3],
        outputs=["a", "b", "c", "d"],
    )
    assert _problems(lambda: validate_source(src)) == [
        (f"{N}[0].op", LIENAR),
        (f"{N}[1].inputs", "add takes 2 inputs, got 1"),
        (f"{N}[2].inputs", f"matmul 'c': {inner}"),
        (f"{N}[3].inputs", f"matmul 'd': {inner}"),
    ]
    # the oversized nodes' ids sort first: they are inferred before the matmul
    wide = graph(
        node("a", "concat", "x", "x"),
        node("m", "matmul", "x", "x"),
        shape=["batch", 40000],
        outputs=["a", "m"],
    )
    assert [p for p, _ in _problems(lambda: validate_source(wide))] == [f"{N}[0]", f"{N}[1].inputs"]
    big = graph(
        node("a", "concat", "x", "x"),
        node("m", "matmul", "x", "x"),
        shape=["batch", 4096, 2048],
        outputs=["a", "m"],
    )
    assert [p for p, _ in _problems(lambda: validate_source(big))] == [f"{N}[0]", f"{N}[1].inputs"]


def test_a_node_output_is_sized_in_the_graphs_dtype() -> None:
    """[batch, 4096, 4096] in float16 is 2**35 bytes at maxBatch 1024: the limit, allowed."""
    validate_source(graph(node("y", "concat", "x", "x"), shape=["batch", 4096, 2048], dtype="float16"))


def test_analyze_reports_under_spec_graph_by_default() -> None:
    g = Graph.model_validate(graph(node("y", "lienar", "x"))["graph"])
    assert [(p.path, p.message) for p in analyze(g)[1].problems] == [(f"{N}[0].op", LIENAR)]


def test_any_model_with_a_graph_or_a_template_is_a_source() -> None:
    from pydantic import BaseModel

    class GraphOnly(BaseModel):
        graph: Graph

    class TemplateOnly(BaseModel):
        template: TemplateRef

    src = graph(node("y", "linear", "x", outFeatures=4))
    assert validate_source(GraphOnly(graph=Graph.model_validate(src["graph"]))) == validate_source(src)
    tpl = template("bottleneck", features=32)
    only = TemplateOnly(template=TemplateRef.model_validate(tpl["template"]))
    assert validate_source(only) == validate_source(tpl)


def test_the_path_prefix_reaches_every_stage() -> None:
    bad = graph(node("y", "lienar", "x"))
    assert _problems(lambda: validate_source(bad, path_prefix="b.spec")) == [
        ("b.spec.graph.nodes[0].op", LIENAR)
    ]
    assert _problems(lambda: validate_source(5, path_prefix="b.spec")) == [
        ("b.spec", "must be a mapping, got 5")
    ]
    assert _problems(lambda: validate_source(5)) == [("spec", "must be a mapping, got 5")]
    g = Graph.model_validate(bad["graph"])
    assert [(p.path, p.message) for p in fill_defaults(g)[2]] == [(f"{N}[0].op", LIENAR)]


def test_expand_reports_a_template_whose_nodes_are_invalid_at_its_params() -> None:
    """transformer-mlp's hidden layer is 4 * features: past the widest op at features 65536."""
    assert _problems(lambda: expand(template("transformer-mlp", features=65536))) == [
        (T, "expands to a graph where nodes[1].params.outFeatures: must be at most 65536, got 262144")
    ]


def test_unknown_source_fields_are_named_with_a_suggestion() -> None:
    assert _problems(lambda: parse_source({"template": {"name": "mlp", "parms": {}}})) == [
        ("spec.template.parms", "unknown field 'parms'; did you mean 'params'?")
    ]
    assert _problems(lambda: parse_source(5)) == [("spec", "must be a mapping, got 5")]
