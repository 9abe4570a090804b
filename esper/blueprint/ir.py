"""Pydantic models of the Blueprint IR: a small typed graph, or a named template that expands into one.

The models only check form (names, lengths, types). Meaning (ops, params, shapes, cycles) is checked by
:mod:`esper.blueprint.validate`, which names the node and field at fault.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

IDENT_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
BATCH: Final = "batch"
MAX_DIM = 65536
"""Largest static dimension size."""
MAX_PARAM_KEYS = 32
"""Most keys in a node's or template's `params` (the largest op has fewer than 10)."""

Ident = Annotated[str, Field(pattern=IDENT_PATTERN, description="An identifier: lowercase, digits, '_'.")]
Size = Annotated[int, Field(ge=1, le=MAX_DIM)]
Dim = Annotated[
    Size | Literal["batch"],
    Field(description="A dimension size (1..65536), or 'batch' for the symbolic batch dimension."),
]
DType = Literal["float32", "float16", "bfloat16"]


class IRModel(BaseModel):
    """Closed and strict: `"512"` or `true` is no integer, as the API server's schema would say."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True, allow_inf_nan=False)


class TensorSpec(IRModel):
    """A graph input: name and shape. The first dimension is the symbolic batch."""

    name: Ident = Field(description="Input name, referenced by nodes' inputs.")
    shape: list[Dim] = Field(
        min_length=2, max_length=5, description="Shape; the first entry is 'batch', the rest are sizes."
    )


class Node(IRModel):
    """One operation of the graph."""

    id: Ident = Field(description="Node id, unique among inputs and nodes.")
    op: str = Field(min_length=1, max_length=64, description="Operation name (see `esper ops`).")
    inputs: list[Ident] = Field(
        default_factory=list, max_length=8, description="Ids of the nodes or graph inputs this node reads."
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        max_length=MAX_PARAM_KEYS,
        description="Operation parameters (camelCase), checked against the op.",
    )


class Graph(IRModel):
    """An explicit graph: inputs, nodes in any order, outputs."""

    dtype: DType = Field(default="float32", description="Element type of the inputs and parameters.")
    inputs: list[TensorSpec] = Field(min_length=1, max_length=4, description="Graph inputs.")
    nodes: list[Node] = Field(min_length=1, max_length=256, description="Graph nodes.")
    outputs: list[Ident] = Field(
        min_length=1, max_length=4, description="Ids of the nodes (or inputs) whose values are returned."
    )


class TemplateRef(IRModel):
    """A named template and its parameters; expands into a Graph."""

    name: str = Field(min_length=1, max_length=64, description="Template name (see `esper templates`).")
    params: dict[str, Any] = Field(
        default_factory=dict, max_length=MAX_PARAM_KEYS, description="Template parameters (camelCase)."
    )


class BlueprintSource(IRModel):
    """What a Blueprint describes: exactly one of a template or a graph."""

    template: TemplateRef | None = Field(default=None, description="A named template.")
    graph: Graph | None = Field(default=None, description="An explicit graph.")

    @model_validator(mode="after")
    def _exactly_one(self) -> BlueprintSource:
        if (self.template is None) == (self.graph is None):
            raise ValueError("give exactly one of 'template' or 'graph'")
        return self
