"""A Hugging Face GPT-2 with seed slots: save_pretrained and back, generation with a KV cache,
export to plain PyTorch, attribute pass-through, optimizer restore, causal slots.

Seeds here are eager modules (no compile); tests/integration/test_hf_gpt2.py does the same with a
compiled kernel.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from esper.blueprint import build_module, validate_source
from esper.kasmina import (
    EagerKernel,
    KernelRestoreError,
    KernelShapeError,
    KernelShapeWarning,
    SeedSlot,
    SeedState,
    slots,
    wrap,
)
from esper.kasmina.export import ExportError, unwrap
from esper.kasmina.hf import checkpoint_tensors, from_pretrained
from esper.kasmina.optim import load_optimizer_state
from tests.support.gpt2 import EMBED, SLOTS, batch, gpt2, splits

S = SeedState
FOSSIL, BLENDING = SLOTS


class RowWise(nn.Module):
    """A position-wise seed that takes only `[rows, F]`: proves a per-token slot flattens."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(EMBED, EMBED)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(EMBED, EMBED, generator=g) * 0.05)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise AssertionError(f"per-token seed fed {tuple(x.shape)}")
        return x + torch.tanh(self.fc(x))


def resolver(key: str) -> nn.Module:
    return EagerKernel(RowWise(int(key.rsplit("-", 1)[1])), key)


def grown(steps: int = 4) -> tuple[nn.Module, dict[str, SeedSlot], torch.optim.Optimizer]:
    """GPT-2 with two per-token causal slots: FOSSIL fossilized, BLENDING mid-blend (alpha 0.5)."""
    model = gpt2()
    ss = wrap(model, SLOTS, per_token=True, causal=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train, _ = splits()
    gen = torch.Generator().manual_seed(0)
    model(batch(train, 2, 16, gen))  # the slots record their activation shape
    for i, name in enumerate(SLOTS):
        assert ss[name].germinate(resolver(f"eager:rowwise-{i + 1}")), ss[name].telemetry.last_error
        opt.add_param_group(ss[name].param_group(lr=3e-3))
        ss[name].start_training()

    def steps_(n: int) -> None:
        for _ in range(n):
            x = batch(train, 4, 32, gen)
            model(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            for s in ss.values():
                s.step()

    steps_(steps)
    ss[FOSSIL].start_blending(blend_steps=2)
    ss[BLENDING].start_blending(blend_steps=4)
    steps_(2)
    ss[FOSSIL].fossilize()
    assert (ss[FOSSIL].state, ss[BLENDING].state, ss[BLENDING].alpha) == (S.FOSSILIZED, S.BLENDING, 0.5)
    return model.eval(), ss, opt


@pytest.fixture(scope="module")
def sample() -> torch.Tensor:
    _, val = splits()
    return batch(val, 3, 24, torch.Generator().manual_seed(5))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def test_state_dict_keys_are_the_bare_models_plus_slot_entries() -> None:
    model, _, _ = grown(steps=1)
    bare = set(gpt2().state_dict())
    keys = set(model.state_dict())
    assert not [k for k in keys if ".host." in k]
    extra = keys - bare
    assert {k for k in extra if k.endswith("_extra_state")} == {f"{s}._extra_state" for s in SLOTS}
    assert {k.rsplit(".seed.", 1)[0] for k in extra if ".seed." in k} == set(SLOTS)
    assert bare <= keys
    assert all(isinstance(v, torch.Tensor) for v in model.state_dict().values())


def test_save_pretrained_and_back_with_the_seeds(tmp_path: Path, sample: torch.Tensor) -> None:
    model, ss, _ = grown()
    want = logits(model, sample)
    model.save_pretrained(tmp_path)
    stored = checkpoint_tensors(tmp_path)
    state = json.loads(bytes(stored[f"{FOSSIL}._extra_state"].tolist()))
    assert (state["state"], state["kernelKey"], state["perToken"], state["causal"]) == (
        "fossilized", "eager:rowwise-1", True, True,
    )  # fmt: skip

    from transformers import GPT2LMHeadModel

    back = from_pretrained(GPT2LMHeadModel, tmp_path, kernel_resolver=resolver).eval()
    restored = slots(back)
    assert set(restored) == set(SLOTS)
    assert [(s.state, s.alpha, s.per_token, s.causal) for s in restored.values()] == [
        (S.FOSSILIZED, 1.0, True, True), (S.BLENDING, 0.5, True, True),
    ]  # fmt: skip
    assert restored[FOSSIL].lifecycle.history == ss[FOSSIL].lifecycle.history
    assert torch.equal(logits(back, sample), want)

    # transformers alone loads the host: every host weight equal, the seeds ignored
    bare = GPT2LMHeadModel.from_pretrained(tmp_path)
    host = {k: v for k, v in model.state_dict().items() if ".seed." not in k and "_extra_state" not in k}
    bare_sd = bare.state_dict()
    assert all(torch.equal(bare_sd[k], v) for k, v in host.items())

    with pytest.raises(KernelRestoreError, match="kernel_resolver"):
        from_pretrained(GPT2LMHeadModel, tmp_path)


def test_a_host_only_checkpoint_loads_into_a_wrapped_model() -> None:
    source, target = gpt2(seed=1), gpt2(seed=2)
    wrap(target, SLOTS)
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    assert unexpected == [] and sorted(missing) == sorted(f"{s}._extra_state" for s in SLOTS)
    assert torch.equal(target.transformer.h[1].mlp.host.c_fc.weight, source.transformer.h[1].mlp.c_fc.weight)


def test_attributes_pass_through_to_the_host() -> None:
    model = gpt2()
    host = model.transformer.h[1].mlp
    wrap(model, SLOTS)
    slot = model.transformer.h[1].mlp
    assert isinstance(slot, SeedSlot)
    assert slot.c_fc is host.c_fc and slot.act is host.act
    assert slot.name == FOSSIL  # the slot's own attributes win
    with pytest.raises(AttributeError, match=r"its host 'GPT2MLP' have no attribute 'nope'"):
        _ = slot.nope


def test_generation_with_a_kv_cache_keeps_growing_seeds(sample: torch.Tensor) -> None:
    model, ss, _ = grown()
    prompt = sample[:, :8]
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    full = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.shape == (3, 20)
    assert torch.equal(cached, full)  # one position at a time through the seeds == the whole sequence
    assert (ss[FOSSIL].state, ss[BLENDING].state) == (S.FOSSILIZED, S.BLENDING)
    assert ss[BLENDING].telemetry.skipped_calls == 0


class FixedLength(nn.Module):
    """A seed compiled for one sequence length: refuses any other, as the kernel guard does."""

    def __init__(self, seq: int) -> None:
        super().__init__()
        self.seq = seq
        self.fc = nn.Linear(EMBED, EMBED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (self.seq, EMBED):
            raise KernelShapeError(f"takes (batch, {self.seq}, {EMBED}), got {tuple(x.shape)}")
        return x + self.fc(x)


def test_generation_leaves_a_misfit_blending_seed_out_and_never_culls_it() -> None:
    model = gpt2()
    slot = wrap(model, [BLENDING])[BLENDING]
    x = batch(splits()[0], 2, 16, torch.Generator().manual_seed(1))
    model(x)
    assert slot.germinate(EagerKernel(FixedLength(16), "eager:fixed16"))
    slot.start_training()
    slot.start_blending(blend_steps=2)
    slot.step()
    model.eval()
    with pytest.warns(KernelShapeWarning, match="left out of this blending call"):
        out = model.generate(x[:, :16], max_new_tokens=4, do_sample=False, use_cache=True)
    assert out.shape == (2, 20)
    assert slot.state is S.BLENDING and slot.seed is not None
    # 4 forwards: the 16-token prompt (fits), then 3 single-token steps from the cache (left out)
    assert slot.telemetry.skipped_calls == 3


def test_export_gives_a_plain_model_with_the_same_outputs(sample: torch.Tensor) -> None:
    model, ss, _ = grown()
    with pytest.raises(ExportError, match=f"slot {BLENDING} is blending"):
        unwrap(model)
    assert set(slots(model)) == set(SLOTS)  # refused before anything was replaced
    ss[BLENDING].fossilize()
    want = logits(model, sample)
    plain = unwrap(copy.deepcopy(model))
    assert not slots(plain)
    assert not [type(m) for m in plain.modules() if type(m).__module__.startswith("esper")]
    assert torch.allclose(logits(plain, sample), want, atol=1e-5, rtol=0)
    assert isinstance(plain.transformer.h[1].mlp, nn.Sequential)
    assert isinstance(plain.transformer.h[0].mlp, type(gpt2().transformer.h[0].mlp))


def test_export_of_a_blueprint_seed_is_an_fx_graph_with_its_weights(sample: torch.Tensor) -> None:
    model = gpt2()
    slot = wrap(model, [FOSSIL], per_token=True)[FOSSIL]
    model(sample)
    graph = validate_source({"template": {"name": "lora-adapter", "params": {"features": EMBED, "rank": 4}}})
    seed = build_module(graph, seed=3)
    assert slot.germinate(EagerKernel(seed, "eager:lora"))
    with torch.no_grad():
        for p in seed.parameters():
            p.add_(0.01)  # "trained": the export must carry these weights, not the initial ones
    slot.start_training()
    slot.start_blending(blend_steps=1)
    slot.step()
    slot.fossilize()
    model.eval()
    want = logits(model, sample)
    plain = unwrap(model)
    exported = plain.transformer.h[1].mlp[1]
    assert isinstance(exported, torch.fx.GraphModule)
    assert torch.allclose(logits(plain, sample), want, atol=1e-5, rtol=0)


def test_optimizer_state_comes_back_with_the_seed_groups(tmp_path: Path, sample: torch.Tensor) -> None:
    model, _, opt = grown()
    model.save_pretrained(tmp_path)
    saved_opt = copy.deepcopy(opt.state_dict())

    from transformers import GPT2LMHeadModel

    back = from_pretrained(GPT2LMHeadModel, tmp_path, kernel_resolver=resolver)
    host_params = [p for n, p in back.named_parameters() if ".seed." not in n]
    fresh = torch.optim.AdamW(host_params, lr=1e-3)
    load_optimizer_state(fresh, back, saved_opt)
    assert [g.get("seed") for g in fresh.param_groups] == [None, *SLOTS]
    assert [g["lr"] for g in fresh.param_groups] == [1e-3, 3e-3, 3e-3]

    def step(m: nn.Module, o: torch.optim.Optimizer) -> None:
        m.train()
        m(sample, labels=sample).loss.backward()
        o.step()
        o.zero_grad()

    step(model, opt)
    step(back, fresh)
    a, b = dict(model.named_parameters()), dict(back.named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # Adam moments and step counts restored


@pytest.mark.parametrize(
    ("wrapped", "message"),
    [
        ([], r"saved param group of seed 'transformer.h.1.mlp': the model has no such slot"),
        ([FOSSIL], r"seed 'transformer.h.1.mlp': the saved group has 2 parameters, the slot's seed 0"),
    ],
)
def test_optimizer_restore_refuses_groups_the_model_cannot_fill(wrapped: list[str], message: str) -> None:
    _, _, opt = grown(steps=1)
    saved = opt.state_dict()
    other = gpt2()
    wrap(other, wrapped)
    fresh = torch.optim.AdamW(other.parameters(), lr=1e-3)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=message):
        load_optimizer_state(fresh, other, saved)
    assert fresh.state_dict() == before


def _attention(causal: bool) -> nn.Module:
    params: dict[str, Any] = {"embed": EMBED, "heads": 4, "seq": 16, "causal": causal}
    return build_module(validate_source({"template": {"name": "attention-block", "params": params}}))


def test_a_causal_slot_refuses_a_kernel_that_sees_the_future() -> None:
    model = gpt2()
    slot = wrap(model, [FOSSIL], causal=True)[FOSSIL]
    model(batch(splits()[0], 2, 16, torch.Generator().manual_seed(0)))
    assert not slot.germinate(EagerKernel(_attention(False), "eager:attn"))
    assert slot.state is S.DORMANT
    assert "NotCausal" in str(slot.telemetry.last_error) and "lets positions see later ones" in str(
        slot.telemetry.last_error
    )
    assert not slot.germinate(EagerKernel(nn.Identity(), "eager:unknown"))
    assert "does not say if it is causal" in str(slot.telemetry.last_error)
    assert slot.germinate(EagerKernel(_attention(True), "eager:causal-attn"))


def test_a_per_token_causal_slot_takes_any_position_wise_kernel() -> None:
    model = gpt2()
    slot = wrap(model, [FOSSIL], causal=True, per_token=True)[FOSSIL]
    model(batch(splits()[0], 2, 16, torch.Generator().manual_seed(0)))
    assert slot.germinate(resolver("eager:rowwise-1"))


def test_checkpoints_with_host_keys_still_load(sample: torch.Tensor) -> None:
    model, _, _ = grown(steps=1)
    old_style = {}
    for k, v in model.state_dict().items():
        slot = next((s for s in SLOTS if k.startswith(s + ".")), None)
        rest = k[len(slot) + 1 :] if slot else ""
        legacy = slot and not rest.startswith(("seed.", "_extra_state"))
        old_style[f"{slot}.host.{rest}" if legacy else k] = v
    assert f"{FOSSIL}.host.c_fc.weight" in old_style
    fresh = gpt2(seed=7)
    wrap(fresh, SLOTS)
    for s in slots(fresh).values():
        s.kernel_resolver = resolver
    fresh.load_state_dict(old_style)  # strict
    assert torch.equal(logits(fresh.eval(), sample), logits(model, sample))


def test_a_host_whose_names_clash_with_the_slot_is_refused() -> None:
    host = nn.Module()
    host.seed = nn.Linear(4, 4)
    model = nn.Sequential(host)
    with pytest.raises(ValueError, match=r"cannot wrap 0: top-level state_dict names \['seed'\]"):
        wrap(model, ["0"])
    assert model[0] is host
