"""Deep validation of a Blueprint: expands templates, fills op defaults, checks structure and shapes.

All findings are collected in one pass, each with the path of the field at fault, so the operator can
put them all in the Blueprint's status and the author fixes them in one edit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from esper.blueprint.errors import BlueprintInvalid, Problem, describe, pydantic_problems, suggest
from esper.blueprint.graphs import find_cycle, topo_order
from esper.blueprint.ir import BATCH, BlueprintSource, Graph, Node, TemplateRef, TensorSpec
from esper.blueprint.opdef import MAX_DIM, Params, Shape, ShapeError, fmt, numel
from esper.blueprint.ops import OPS
from esper.blueprint.templates import TEMPLATES

MAX_PARAMS = 50_000_000
"""Largest total parameter count of a graph: seeds are small; this keeps compiles bounded."""
MAX_NODES = 256
MAX_SAMPLE_ELEMENTS = 2**24
"""Largest value of one sample (elements, batch excluded): 64 MiB in float32."""
MAX_BATCH_BYTES = 2**35
"""Largest value at `maxBatch` (bytes): 32 GiB. Checked before anything is allocated."""
DEFAULT_MAX_BATCH = 1024
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# Node ids become attribute names of a torch.nn.Module container (`nodes.<id>.weight`); these would
# clash with the container's own attributes. tests check the list against torch.
# fmt: off
RESERVED_IDS = frozenset([
    "add_module", "apply", "bfloat16", "buffers", "call_super_init", "children", "compile", "cpu", "cuda",
    "double", "dump_patches", "eval", "extra_repr", "float", "forward", "get_buffer", "get_extra_state",
    "get_parameter", "get_submodule", "half", "ipu", "load_state_dict", "modules", "mtia", "named_buffers",
    "named_children", "named_modules", "named_parameters", "parameters", "register_backward_hook",
    "register_buffer", "register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
    "register_full_backward_pre_hook", "register_load_state_dict_post_hook",
    "register_load_state_dict_pre_hook", "register_module", "register_parameter",
    "register_state_dict_post_hook", "register_state_dict_pre_hook", "requires_grad_", "set_extra_state",
    "set_submodule", "share_memory", "state_dict", "to", "to_empty", "train", "training", "type", "xpu",
    "zero_grad",
])
# fmt: on

SPEC_ONLY_FIELDS = ("targets", "compile", "historyLimit")
"""Fields of a Blueprint spec that are not the source: checked by the contracts."""
_IR_FIELDS = {f for m in (BlueprintSource, Graph, Node, TensorSpec, TemplateRef) for f in m.model_fields}


@dataclass
class Analysis:
    """What checking a graph learns: its problems, every value's shape, the parameter count."""

    problems: list[Problem] = field(default_factory=list)
    shapes: dict[str, Shape] = field(default_factory=dict)
    params: int = 0
    max_batch: int = DEFAULT_MAX_BATCH


def parse_source(source: BlueprintSource | Mapping[str, Any] | Any, prefix: str = "spec") -> BlueprintSource:
    """A BlueprintSource from a dict or any model with `template`/`graph`; raises BlueprintInvalid with
    every form error. Other fields of a Blueprint spec are the contracts' to check (see
    `esper.contracts.validation`): a dict's `targets`/`compile` are ignored here."""
    if isinstance(source, BlueprintSource):
        return source
    if isinstance(source, BaseModel):
        source = {"template": getattr(source, "template", None), "graph": getattr(source, "graph", None)}
        source = {k: v.model_dump() for k, v in source.items() if v is not None}
    if not isinstance(source, Mapping):
        raise BlueprintInvalid([Problem(prefix, f"must be a mapping, got {describe(source)}")])
    data = {k: v for k, v in source.items() if k not in SPEC_ONLY_FIELDS}
    try:
        return BlueprintSource.model_validate(data)
    except ValidationError as err:
        raise BlueprintInvalid(pydantic_problems(err, prefix, _IR_FIELDS)) from None


def parse_params(
    op_or_model: type[Params], params: Mapping[str, Any], path: str
) -> tuple[Params | None, list[Problem]]:
    """Validate params against a model; problems point at `path.<key>`."""
    try:
        return op_or_model.model_validate(dict(params)), []
    except ValidationError as err:
        return None, pydantic_problems(err, path, op_or_model.model_fields)


def expand_template(ref: TemplateRef, prefix: str = "spec.template") -> Graph:
    """The graph a template draws; raises BlueprintInvalid for an unknown name or bad params."""
    tdef = TEMPLATES.get(ref.name)
    if tdef is None:
        msg = f"unknown template '{ref.name}'" + suggest(ref.name, TEMPLATES)
        raise BlueprintInvalid([Problem(f"{prefix}.name", msg + f" (known: {', '.join(sorted(TEMPLATES))})")])
    params, problems = parse_params(tdef.params, ref.params, f"{prefix}.params")
    if params is None:
        raise BlueprintInvalid(problems)
    return tdef.expand(params)


def _node_problems(node: Node, dtype: str, where: str) -> tuple[Params | None, list[Problem]]:
    """Op name, params and dtype of one node."""
    op = OPS.get(node.op)
    if op is None:
        return None, [Problem(f"{where}.op", f"unknown op '{node.op}'" + suggest(node.op, OPS))]
    params, problems = parse_params(op.params, node.params, f"{where}.params")
    if dtype not in op.dtypes:
        problems.append(Problem(f"{where}.op", f"{node.op} does not support {dtype}: {op.dtype_reason}"))
    lo, hi = op.arity
    if not lo <= len(node.inputs) <= hi:
        msg = f"{node.op} takes {op.arity_text()}, got {len(node.inputs)}"
        problems.append(Problem(f"{where}.inputs", msg))
    return params, problems


def fill_defaults(graph: Graph, prefix: str = "spec.graph") -> tuple[Graph, dict[str, Params], list[Problem]]:
    """The graph with every op's params defaults-filled (invalid nodes left as they are)."""
    parsed: dict[str, Params] = {}
    problems: list[Problem] = []
    nodes = []
    for i, node in enumerate(graph.nodes):
        params, probs = _node_problems(node, graph.dtype, f"{prefix}.nodes[{i}]")
        problems += probs
        if params is not None:
            parsed.setdefault(node.id, params)
            node = node.model_copy(update={"params": params.model_dump(mode="json")})
        nodes.append(node)
    return graph.model_copy(update={"nodes": nodes}), parsed, problems


def _check_inputs(graph: Graph, prefix: str, a: Analysis) -> None:
    for i, spec in enumerate(graph.inputs):
        where = f"{prefix}.inputs[{i}].shape"
        if spec.shape[0] != BATCH:
            a.problems.append(Problem(f"{where}[0]", f"the first dim must be 'batch', got {spec.shape[0]}"))
        for j, d in enumerate(spec.shape[1:], start=1):
            if d == BATCH:
                a.problems.append(Problem(f"{where}[{j}]", "'batch' may only be the first dim"))
            elif not 1 <= int(d) <= MAX_DIM:
                a.problems.append(Problem(f"{where}[{j}]", f"sizes must be 1..{MAX_DIM}, got {d}"))
        if all(isinstance(d, int) and 1 <= d <= MAX_DIM for d in spec.shape[1:]) and spec.shape[0] == BATCH:
            shape = tuple(spec.shape)
            if _size_ok(shape, graph.dtype, f"{prefix}.inputs[{i}].shape", f"input '{spec.name}'", a):
                a.shapes[spec.name] = shape


def _size_ok(shape: Shape, dtype: str, path: str, what: str, a: Analysis) -> bool:
    """The activation bound: one sample, and the whole batch at maxBatch, must fit the limits."""
    elements = numel(shape)
    if elements > MAX_SAMPLE_ELEMENTS:
        msg = f"{what} is {fmt(shape)}: {elements:,} elements per sample; at most {MAX_SAMPLE_ELEMENTS:,}"
        a.problems.append(Problem(path, msg))
        return False
    total = elements * a.max_batch * _DTYPE_BYTES.get(dtype, 4)
    if total > MAX_BATCH_BYTES:
        msg = (
            f"{what} is {fmt(shape)}: {total / 2**30:,.1f} GiB at maxBatch {a.max_batch}; "
            f"at most {MAX_BATCH_BYTES / 2**30:,.0f} GiB (lower compile.maxBatch or the sizes)"
        )
        a.problems.append(Problem(path, msg))
        return False
    return True


def _check_ids(graph: Graph, prefix: str, a: Analysis) -> set[str]:
    """Duplicate and reserved ids; returns the set of ids that exist."""
    first: dict[str, str] = {}
    for i, spec in enumerate(graph.inputs):
        path = f"{prefix}.inputs[{i}].name"
        if spec.name in first:
            a.problems.append(Problem(path, f"duplicate id '{spec.name}' (also {first[spec.name]})"))
        first.setdefault(spec.name, path)
    for i, node in enumerate(graph.nodes):
        path = f"{prefix}.nodes[{i}].id"
        if node.id in first:
            a.problems.append(Problem(path, f"duplicate id '{node.id}' (also {first[node.id]})"))
        if node.id in RESERVED_IDS:
            a.problems.append(Problem(path, f"'{node.id}' is reserved (a torch.nn.Module attribute)"))
        first.setdefault(node.id, path)
    return set(first)


def _check_refs(graph: Graph, prefix: str, known: set[str], a: Analysis) -> None:
    for i, node in enumerate(graph.nodes):
        for j, ref in enumerate(node.inputs):
            if ref not in known:
                msg = f"unknown input '{ref}'" + suggest(ref, known)
                a.problems.append(Problem(f"{prefix}.nodes[{i}].inputs[{j}]", msg))
    for k, out in enumerate(graph.outputs):
        if out not in known:
            msg = f"unknown output '{out}'" + suggest(out, known)
            a.problems.append(Problem(f"{prefix}.outputs[{k}]", msg))
        elif out in graph.outputs[:k]:
            a.problems.append(Problem(f"{prefix}.outputs[{k}]", f"'{out}' is already an output"))


def _check_cycles(graph: Graph, prefix: str, a: Analysis) -> list[Node]:
    """Reports each cycle once; returns the nodes in canonical order (those not on/after a cycle)."""
    order, stuck = topo_order(graph.nodes)
    index = {n.id: i for i, n in enumerate(graph.nodes)}
    while stuck:
        cycle = find_cycle(stuck)
        first = min(cycle, key=lambda nid: index[nid])
        msg = "cycle: " + " -> ".join(cycle)
        a.problems.append(Problem(f"{prefix}.nodes[{index[first]}].inputs", msg))
        on_cycle = set(cycle)
        _, stuck = topo_order([n for n in stuck if n.id not in on_cycle])
    return order


def _check_reach(graph: Graph, prefix: str, a: Analysis) -> None:
    """Nodes and inputs that feed no output are errors: they would be compiled and never used."""
    by_id = {n.id: n for n in graph.nodes}
    live: set[str] = set()
    todo = [o for o in graph.outputs]
    while todo:
        nid = todo.pop()
        if nid in live:
            continue
        live.add(nid)
        if nid in by_id:
            todo.extend(by_id[nid].inputs)
    for i, node in enumerate(graph.nodes):
        if node.id not in live:
            msg = f"node '{node.id}' does not reach any output (remove it or list it in outputs)"
            a.problems.append(Problem(f"{prefix}.nodes[{i}]", msg))
    for i, spec in enumerate(graph.inputs):
        if spec.name not in live:
            a.problems.append(Problem(f"{prefix}.inputs[{i}]", f"input '{spec.name}' is not used"))


def _infer(order: list[Node], parsed: dict[str, Params], graph: Graph, prefix: str, a: Analysis) -> None:
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    for node in order:
        where = f"{prefix}.nodes[{index[id(node)]}]"
        params = parsed.get(node.id)
        ins = [a.shapes.get(r) for r in node.inputs]
        op = OPS.get(node.op)
        if params is None or op is None or any(s is None for s in ins):
            continue
        lo, hi = op.arity
        if not lo <= len(ins) <= hi:
            continue
        shapes: list[Shape] = [s for s in ins if s is not None]
        try:
            out = op.shape(params, shapes)
        except ShapeError as e:
            path = f"{where}.params.{e.field}" if e.field else f"{where}.inputs"
            got = ", ".join(fmt(s) for s in shapes)
            a.problems.append(Problem(path, f"{node.op} '{node.id}': {e.message} (inputs: {got})"))
            continue
        if any(int(d) > MAX_DIM for d in out[1:]):
            msg = f"{node.op} '{node.id}' gives {fmt(out)}; every dim must be at most {MAX_DIM}"
            a.problems.append(Problem(where, msg))
            continue
        if not _size_ok(out, graph.dtype, where, f"{node.op} '{node.id}'", a):
            continue
        a.shapes[node.id] = out
        a.params += op.count(params, shapes)


def analyze(
    graph: Graph, prefix: str = "spec.graph", *, max_batch: int = DEFAULT_MAX_BATCH
) -> tuple[Graph, Analysis]:
    """Every structural and shape problem of a graph, plus shapes and parameter count."""
    filled, parsed, node_problems = fill_defaults(graph, prefix)
    a = Analysis(max_batch=max_batch)
    if len(graph.nodes) > MAX_NODES:
        a.problems.append(Problem(f"{prefix}.nodes", f"{len(graph.nodes)} nodes; at most {MAX_NODES}"))
    _check_inputs(graph, prefix, a)
    known = _check_ids(graph, prefix, a)
    a.problems += node_problems
    before = len(a.problems)
    _check_refs(graph, prefix, known, a)
    order = _check_cycles(filled, prefix, a)
    if len(a.problems) == before:  # with a dangling ref, "unused" findings would only be echoes of it
        _check_reach(graph, prefix, a)
    _infer(order, parsed, filled, prefix, a)
    if a.params > MAX_PARAMS:
        a.problems.append(Problem(prefix, f"{a.params:,} parameters; the limit is {MAX_PARAMS:,}"))
    return filled, a


def _graph_of(src: BlueprintSource, path_prefix: str) -> Graph:
    """The template's expansion, or the explicit graph."""
    if src.template is not None:
        return expand_template(src.template, f"{path_prefix}.template")
    assert src.graph is not None
    return src.graph


def expand(source: BlueprintSource | Mapping[str, Any] | Any, *, path_prefix: str = "spec") -> Graph:
    """The explicit graph of a source, every op's params defaults-filled (what the digest covers)."""
    src = parse_source(source, path_prefix)
    graph = _graph_of(src, path_prefix)
    filled, _, problems = fill_defaults(graph, f"{path_prefix}.graph")
    if problems:
        raise BlueprintInvalid(_relocate(problems, src, path_prefix))
    return filled


def _relocate(problems: list[Problem], src: BlueprintSource, prefix: str) -> list[Problem]:
    """Graph problems of an expanded template point at the template's params (the author's input)."""
    if src.template is None:
        return problems
    graph_prefix = f"{prefix}.graph"
    return [
        Problem(
            f"{prefix}.template.params",
            f"expands to a graph where {p.path.removeprefix(graph_prefix + '.')}: {p.message}",
        )
        if p.path.startswith(graph_prefix)
        else p
        for p in problems
    ]


def validate_source(
    source: BlueprintSource | Mapping[str, Any] | Any,
    *,
    path_prefix: str = "spec",
    max_batch: int = DEFAULT_MAX_BATCH,
) -> Graph:
    """The expanded, defaults-filled graph of a valid source; else BlueprintInvalid with every problem.

    Only the source (template or graph): a whole Blueprint spec is checked by
    `esper.contracts.validation.validate_blueprint_spec`, which calls this.
    """
    src = parse_source(source, path_prefix)
    graph = _graph_of(src, path_prefix)
    filled, a = analyze(graph, f"{path_prefix}.graph", max_batch=max_batch)
    if a.problems:
        raise BlueprintInvalid(sorted(_relocate(a.problems, src, path_prefix), key=_path_key))
    return filled


def _path_key(p: Problem) -> list[tuple[int, str | int]]:
    """Sort problems in document order: nodes[2] before nodes[10]."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"[\[\]]", p.path) if t]


def _checked(graph: Graph) -> Analysis:
    _, a = analyze(graph, "graph")
    if a.problems:
        raise BlueprintInvalid(a.problems)
    return a


def output_shapes(graph: Graph) -> list[Shape]:
    """Shapes of the graph's outputs, 'batch' first; raises BlueprintInvalid if the graph is invalid."""
    a = _checked(graph)
    return [a.shapes[o] for o in graph.outputs]


def param_count(graph: Graph) -> int:
    """Number of trainable parameters (buffers such as batch-norm statistics excluded)."""
    return _checked(graph).params
