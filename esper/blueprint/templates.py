"""Named templates: common seed architectures, parameterized, that expand into an explicit Graph.

Most templates map [batch, ...] to the same shape, because a seed's output is blended into the host
activation it reads. Each has one graph input named `x`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from esper.blueprint.ir import BATCH, Graph, Node, TensorSpec
from esper.blueprint.opdef import FieldError, Params, Size

Activation = Literal["relu", "gelu", "silu", "tanh"]
Norm = Literal["none", "layer", "rms"]
Blocks = Annotated[int, Field(ge=1, le=16)]
Heads = Annotated[int, Field(ge=1, le=256)]
Seq = Annotated[int, Field(ge=1, le=4096)]
Spatial = Annotated[int, Field(ge=1, le=1024)]
OddKernel = Annotated[int, Field(ge=1, le=15)]


class _Graph:
    """Appends nodes with unique ids; keeps template code close to the diagram it draws."""

    def __init__(self, shape: list[int]) -> None:
        self.inputs = [TensorSpec(name="x", shape=[BATCH, *shape])]
        self.nodes: list[Node] = []

    def op(self, id_: str, op: str, *inputs: str, **params: Any) -> str:
        self.nodes.append(Node(id=id_, op=op, inputs=list(inputs), params=params))
        return id_

    def norm(self, id_: str, kind: str, x: str) -> str:
        if kind == "none":
            return x
        return self.op(id_, "layer_norm" if kind == "layer" else "rms_norm", x)

    def graph(self, *outputs: str) -> Graph:
        return Graph(inputs=self.inputs, nodes=self.nodes, outputs=list(outputs))


def _odd(kernel: int) -> None:
    if kernel % 2 == 0:
        raise FieldError("kernelSize", "must be odd, so the output keeps the input's height and width")


class MlpParams(Params):
    features: Size = 64
    hidden: Size = 256
    outFeatures: Size | None = Field(default=None, description="Defaults to features (same shape).")
    activation: Activation = "gelu"


def mlp(p: MlpParams) -> Graph:
    g = _Graph([p.features])
    h = g.op(p.activation, p.activation, g.op("fc1", "linear", "x", outFeatures=p.hidden))
    return g.graph(g.op("fc2", "linear", h, outFeatures=p.outFeatures or p.features))


class ResidualMlpParams(Params):
    features: Size = 64
    hidden: Size = 256
    blocks: Blocks = 2
    activation: Activation = "gelu"
    norm: Norm = "none"


def residual_mlp(p: ResidualMlpParams) -> Graph:
    g = _Graph([p.features])
    h = "x"
    for b in range(p.blocks):
        t = g.norm(f"b{b}_norm", p.norm, h)
        t = g.op(f"b{b}_fc1", "linear", t, outFeatures=p.hidden)
        t = g.op(f"b{b}_act", p.activation, t)
        t = g.op(f"b{b}_fc2", "linear", t, outFeatures=p.features)
        h = g.op(f"b{b}_add", "add", h, t)
    return g.graph(h)


class BottleneckParams(Params):
    features: Size = 64
    bottleneck: Size = 16
    activation: Activation = "relu"

    @model_validator(mode="after")
    def _check(self) -> BottleneckParams:
        if self.bottleneck > self.features:
            raise FieldError("bottleneck", f"must be at most features ({self.features})")
        return self


def bottleneck(p: BottleneckParams) -> Graph:
    g = _Graph([p.features])
    t = g.op("down", "linear", "x", outFeatures=p.bottleneck)
    t = g.op("act", p.activation, t)
    t = g.op("up", "linear", t, outFeatures=p.features)
    return g.graph(g.op("add", "add", "x", t))


class LoraParams(Params):
    features: Size = 64
    rank: Annotated[int, Field(ge=1, le=256)] = 8
    alpha: float = Field(default=16.0, gt=0, le=1024, description="Output scale is alpha / rank.")
    zeroInit: bool = Field(default=False, description="Start B at zero, so the adapter starts as 0.")
    residual: bool = Field(
        default=True, description="Return x + delta (a seed replaces its activation when fossilized)."
    )

    @model_validator(mode="after")
    def _check(self) -> LoraParams:
        if self.rank > self.features:
            raise FieldError("rank", f"must be at most features ({self.features})")
        return self


def lora_adapter(p: LoraParams) -> Graph:
    """x + B(A x) * alpha/rank, or the delta alone with `residual: false`."""
    g = _Graph([p.features])
    a = g.op("lora_a", "linear", "x", outFeatures=p.rank, bias=False)
    init = "zeros" if p.zeroInit else "default"
    b = g.op("lora_b", "linear", a, outFeatures=p.features, bias=False, init=init)
    delta = g.op("scale", "scale", b, value=p.alpha / p.rank)
    return g.graph(g.op("add", "add", "x", delta) if p.residual else delta)


class AttentionBlockParams(Params):
    embed: Size = 64
    heads: Heads = 4
    seq: Seq = 16
    causal: bool = Field(
        default=False,
        description="false: every position attends to every other, later ones included; a language "
        "model needs true (manifests record it; `wrap(..., causal=True)` refuses a non-causal kernel).",
    )

    @model_validator(mode="after")
    def _check(self) -> AttentionBlockParams:
        if self.embed % self.heads:
            raise FieldError("heads", f"must divide embed ({self.embed})")
        return self


def attention_block(p: AttentionBlockParams) -> Graph:
    g = _Graph([p.seq, p.embed])
    t = g.op("attn", "multihead_attention", g.op("norm", "layer_norm", "x"), heads=p.heads, causal=p.causal)
    return g.graph(g.op("add", "add", "x", t))


class TransformerMlpParams(Params):
    features: Size = 64
    hidden: Size | None = Field(default=None, description="Defaults to 4 * features.")
    seq: Seq | None = Field(default=None, description="If set, the input is [batch, seq, features].")
    activation: Activation = "gelu"
    dropout: float = Field(default=0.0, ge=0, lt=1)


def transformer_mlp(p: TransformerMlpParams) -> Graph:
    g = _Graph([p.seq, p.features] if p.seq else [p.features])
    t = g.op("norm", "layer_norm", "x")
    t = g.op("fc1", "linear", t, outFeatures=p.hidden or 4 * p.features)
    t = g.op("act", p.activation, t)
    t = g.op("fc2", "linear", t, outFeatures=p.features)
    if p.dropout:
        t = g.op("drop", "dropout", t, p=p.dropout)
    return g.graph(g.op("add", "add", "x", t))


class TransformerBlockParams(AttentionBlockParams):
    hidden: Size | None = Field(default=None, description="Defaults to 4 * embed.")


def transformer_block(p: TransformerBlockParams) -> Graph:
    g = _Graph([p.seq, p.embed])
    t = g.op("attn", "multihead_attention", g.op("norm1", "layer_norm", "x"), heads=p.heads, causal=p.causal)
    h = g.op("add1", "add", "x", t)
    t = g.op("fc1", "linear", g.op("norm2", "layer_norm", h), outFeatures=p.hidden or 4 * p.embed)
    t = g.op("fc2", "linear", g.op("act", "gelu", t), outFeatures=p.embed)
    return g.graph(g.op("add2", "add", h, t))


class ConvParams(Params):
    channels: Size = 16
    height: Spatial = 8
    width: Spatial = 8
    kernelSize: OddKernel = 3

    @model_validator(mode="after")
    def _check(self) -> ConvParams:
        _odd(self.kernelSize)
        return self


class ConvBlockParams(ConvParams):
    norm: Literal["batch", "none"] = "batch"


def conv_block(p: ConvBlockParams) -> Graph:
    """conv-bn-relu-conv-bn plus the input (a ResNet basic block without downsampling)."""
    g = _Graph([p.channels, p.height, p.width])
    pad = p.kernelSize // 2
    t = g.op("conv1", "conv2d", "x", outChannels=p.channels, kernelSize=p.kernelSize, padding=pad)
    if p.norm == "batch":
        t = g.op("bn1", "batch_norm", t)
    t = g.op("relu1", "relu", t)
    t = g.op("conv2", "conv2d", t, outChannels=p.channels, kernelSize=p.kernelSize, padding=pad)
    if p.norm == "batch":
        t = g.op("bn2", "batch_norm", t)
    return g.graph(g.op("relu2", "relu", g.op("add", "add", "x", t)))


class DepthwiseParams(ConvParams):
    residual: bool = True


def depthwise_separable_conv(p: DepthwiseParams) -> Graph:
    g = _Graph([p.channels, p.height, p.width])
    c, k = p.channels, p.kernelSize
    t = g.op("depthwise", "conv2d", "x", outChannels=c, kernelSize=k, padding=k // 2, groups=c)
    t = g.op("pointwise", "conv2d", t, outChannels=c, kernelSize=1)
    t = g.op("relu", "relu", g.op("bn", "batch_norm", t))
    return g.graph(g.op("add", "add", "x", t) if p.residual else t)


class SqueezeExcitationParams(Params):
    channels: Size = 16
    height: Spatial = 8
    width: Spatial = 8
    reduction: Annotated[int, Field(ge=1, le=64)] = 4

    @model_validator(mode="after")
    def _check(self) -> SqueezeExcitationParams:
        if self.channels < self.reduction:
            raise FieldError("reduction", f"must be at most channels ({self.channels})")
        return self


def squeeze_excitation(p: SqueezeExcitationParams) -> Graph:
    """Channel gates from global context: x * sigmoid(W2 relu(W1 mean_hw(x)))."""
    g = _Graph([p.channels, p.height, p.width])
    t = g.op("flatten", "flatten", g.op("pool", "adaptive_avg_pool2d", "x"))
    t = g.op("relu", "relu", g.op("squeeze", "linear", t, outFeatures=p.channels // p.reduction))
    t = g.op("gate", "sigmoid", g.op("excite", "linear", t, outFeatures=p.channels))
    t = g.op("reshape", "reshape", t, shape=[p.channels, 1, 1])
    return g.graph(g.op("mul", "mul", "x", t))


@dataclass(frozen=True)
class TemplateDef:
    """A template: its params model and the function that draws its graph."""

    name: str
    params: type[Params]
    expand: Callable[[Any], Graph]
    doc: str


def _t(name: str, params: type[Params], fn: Callable[[Any], Graph], doc: str) -> TemplateDef:
    return TemplateDef(name, params, fn, doc)


TEMPLATES: dict[str, TemplateDef] = {
    t.name: t
    for t in [
        _t("mlp", MlpParams, mlp, "Two linear layers and an activation."),
        _t("residual-mlp", ResidualMlpParams, residual_mlp, "Blocks of x + fc2(act(fc1(norm(x))))."),
        _t("bottleneck", BottleneckParams, bottleneck, "x + up(act(down(x))), a narrow middle."),
        _t("lora-adapter", LoraParams, lora_adapter, "x + B(A x) * alpha / rank (low-rank)."),
        _t(
            "attention-block",
            AttentionBlockParams,
            attention_block,
            "x + attention(layer_norm(x)); not causal unless causal: true.",
        ),
        _t("transformer-mlp", TransformerMlpParams, transformer_mlp, "Pre-norm MLP block with residual."),
        _t("transformer-block", TransformerBlockParams, transformer_block, "Pre-norm attention + MLP."),
        _t("conv-block", ConvBlockParams, conv_block, "ResNet basic block over [batch, C, H, W]."),
        _t(
            "depthwise-separable-conv",
            DepthwiseParams,
            depthwise_separable_conv,
            "Depthwise then pointwise conv (+ x).",
        ),
        _t("squeeze-excitation", SqueezeExcitationParams, squeeze_excitation, "Channel gating."),
    ]
}
"""Every template, by name."""
