"""A small Hugging Face GPT-2 grown with a compiled kernel: `esper compile` (quietly), `esper kernels`,
growth in two per-token slots, generation with a KV cache, save_pretrained and back, export to plain
PyTorch, and torch.compile with no graph break at the kernel calls.

One compile for the module (`gpt2-residual-mlp` of examples/gpt2/blueprints.yaml, through the CLI in
a subprocess, as a user runs it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from esper.blueprint import build_module, validate_source
from esper.kasmina import EagerKernel, KernelModule, SeedSlot, SeedState, load_kernel, slots, warmup, wrap
from esper.kasmina.export import unwrap
from esper.kasmina.hf import from_pretrained
from tests.support.gpt2 import EMBED, SLOTS, batch, gpt2, splits

pytestmark = pytest.mark.slow
S = SeedState
ROOT = Path(__file__).resolve().parents[2]
BLUEPRINTS = ROOT / "examples" / "gpt2" / "blueprints.yaml"
LORA = {"template": {"name": "lora-adapter", "params": {"features": EMBED, "rank": 8, "zeroInit": True}}}


def esper(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'operator'}", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "esper.cli.main", *args], capture_output=True, text=True, env=env, timeout=540
    )


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The residual-MLP Blueprint compiled by `esper compile`: store, key, manifest sha256, output."""
    work = tmp_path_factory.mktemp("gpt2")
    first = BLUEPRINTS.read_text().split("\n---\n")[0]
    (work / "bp.yaml").write_text(first)
    store = work / "store"
    done = esper("compile", str(work / "bp.yaml"), "--store", str(store))
    assert done.returncode == 0, done.stdout + done.stderr
    (key,) = [p.name for p in (store / "kernels").iterdir()]
    sha = hashlib.sha256((store / "kernels" / key / "manifest.json").read_bytes()).hexdigest()
    warmup()
    return {"store": store, "key": key, "sha": sha, "bundle": store / "kernels" / key, "run": done}


def test_compile_is_quiet_and_kernels_lists_what_load_kernel_needs(compiled: dict[str, Any]) -> None:
    done = compiled["run"]
    assert done.stderr == ""  # no torch deprecation warnings, no log lines
    assert "compiled" in done.stdout and "Warning" not in done.stdout
    listed = esper("kernels", "--store", str(compiled["store"]), "--json")
    (row,) = json.loads(listed.stdout)
    assert row["key"] == compiled["key"] and row["manifestSha256"] == compiled["sha"]
    assert (row["blueprint"], row["inputs"], row["outputs"]) == (
        "gpt2-residual-mlp",
        [["batch", 64]],
        [["batch", 64]],
    )
    assert (row["mixesPositions"], row["causal"]) == (False, True)


def lora(seed: int = 1) -> nn.Module:
    return EagerKernel(build_module(validate_source(LORA), seed=seed), "eager:lora")


def grown(compiled: dict[str, Any]) -> tuple[nn.Module, dict[str, SeedSlot]]:
    """GPT-2 with the compiled kernel fossilized in slot 1 and a LoRA seed mid-blend in slot 3."""
    model = gpt2()
    ss = wrap(model, SLOTS, per_token=True, causal=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train, _ = splits()
    gen = torch.Generator().manual_seed(0)
    model(batch(train, 2, 32, gen))
    compiled_slot, lora_slot = (ss[n] for n in SLOTS)
    assert compiled_slot.germinate(compiled["bundle"], expected_sha256=compiled["sha"])
    assert isinstance(compiled_slot.seed, KernelModule)
    assert lora_slot.germinate(lora())
    for s in ss.values():
        opt.add_param_group(s.param_group(lr=3e-3))
        s.start_training()

    def steps(n: int) -> None:
        for _ in range(n):
            x = batch(train, 4, 32, gen)
            model(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            for s in ss.values():
                s.step()

    steps(3)
    compiled_slot.start_blending(blend_steps=2)
    lora_slot.start_blending(blend_steps=4)
    steps(2)
    compiled_slot.fossilize()
    assert [s.state for s in ss.values()] == [S.FOSSILIZED, S.BLENDING]
    return model.eval(), ss


def test_grown_gpt2_generates_saves_reloads_and_exports(compiled: dict[str, Any], tmp_path: Path) -> None:
    model, ss = grown(compiled)
    _, val = splits()
    x = batch(val, 3, 24, torch.Generator().manual_seed(5))

    cached = model.generate(x[:, :8], max_new_tokens=12, do_sample=False, use_cache=True)
    full = model.generate(x[:, :8], max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.shape == (3, 20) and torch.equal(cached, full)
    assert [s.state for s in ss.values()] == [S.FOSSILIZED, S.BLENDING]
    assert [s.telemetry.skipped_calls for s in ss.values()] == [0, 0]

    with torch.no_grad():
        want = model(x).logits
    model.save_pretrained(tmp_path)

    def resolve(key: str) -> nn.Module:
        if key == compiled["key"]:
            return load_kernel(compiled["bundle"], compiled["sha"])
        return lora(seed=99)  # other initial weights: the checkpoint's must replace them

    from transformers import GPT2LMHeadModel

    back = from_pretrained(GPT2LMHeadModel, tmp_path, kernel_resolver=resolve).eval()
    assert [(s.state, s.kernel_key) for s in slots(back).values()] == [
        (S.FOSSILIZED, compiled["key"]), (S.BLENDING, "eager:lora"),
    ]  # fmt: skip
    with torch.no_grad():
        assert torch.equal(back(x).logits, want)

    slots(back)[SLOTS[1]].fossilize()
    with torch.no_grad():
        want = back(x).logits
    plain = unwrap(copy.deepcopy(back))
    assert not [type(m) for m in plain.modules() if type(m).__module__.startswith("esper")]
    with torch.no_grad():
        assert torch.allclose(plain(x).logits, want, atol=1e-5, rtol=0)


def both_compiled(compiled: dict[str, Any]) -> nn.Module:
    """GPT-2 with the compiled kernel fossilized in both slots (two kernel calls per forward)."""
    model = gpt2()
    ss = wrap(model, SLOTS, per_token=True)
    model(batch(splits()[0], 2, 16, torch.Generator().manual_seed(0)))
    for s in ss.values():
        assert s.germinate(compiled["bundle"], expected_sha256=compiled["sha"])
        s.start_training()
        s.start_blending(blend_steps=1)
        s.step()
        s.fossilize()
    return model


def test_torch_compile_has_no_graph_break_at_kernel_calls(compiled: dict[str, Any]) -> None:
    import torch._dynamo

    model = both_compiled(compiled)
    x = batch(splits()[0], 2, 16, torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    bare = torch._dynamo.explain(gpt2())(x)
    torch._dynamo.reset()
    grown_ = torch._dynamo.explain(model)(x)
    assert grown_.graph_break_count == bare.graph_break_count  # what transformers itself breaks on
    code = "\n".join(g.code for g in grown_.graphs)
    assert code.count("esper.kernel_forward") == 2  # both kernel calls inside the graph

    # The fake and autograd registrations, end to end: compiled forward and backward match eager.
    model.train()
    torch._dynamo.reset()
    fast = torch.compile(model, backend="aot_eager")
    out = fast(x, labels=x).loss
    out.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = model(x, labels=x).loss
    ref.backward()
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    seed_grads = [n for n in got if ".seed." in n]
    assert len(seed_grads) == 8  # 4 parameters per kernel, both slots
    assert all(
        torch.allclose(got[n], p.grad, atol=1e-5, rtol=1e-4) for n, p in model.named_parameters() if n in got
    )
