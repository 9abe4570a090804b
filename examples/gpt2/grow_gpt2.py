"""Grow a small Hugging Face GPT-2 with Esper seeds, then generate, save, reload, export and compile.

    python examples/gpt2/grow_gpt2.py                      # eager seeds built from the Blueprints
    esper compile examples/gpt2/blueprints.yaml --store .esper/store
    python examples/gpt2/grow_gpt2.py --store .esper/store # the compiled kernels

A 4-layer, width-64 GPT-2 (random init, `transformers.GPT2Config`) learns the bytes of
examples/data/corpus.txt. Two MLP outputs are seed slots, per-token (a position-wise kernel compiled
for `[batch, 64]` serves every sequence length) and causal (a kernel that could see later positions
is refused). The plateau policy's language-model defaults grow seeds; contributions are judged on a
held-out split the plateau detection does not watch. Then: generation with a KV cache,
`save_pretrained` and `esper.kasmina.hf.from_pretrained`, `esper.kasmina.export.unwrap` to a model
without Esper, and the graph breaks `torch.compile` sees.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch._dynamo
from torch import nn

from esper.blueprint import build_module, validate_source
from esper.contracts.manifest import load_documents
from esper.kasmina import EagerKernel, KernelCatalog, PlateauPolicy, load_kernel, slots, step_slots, wrap
from esper.kasmina.export import unwrap
from esper.kasmina.hf import from_pretrained

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "data" / "corpus.txt"
SLOTS = ["transformer.h.1.mlp", "transformer.h.3.mlp"]


def gpt2(seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=4, n_embd=64, n_head=4, n_positions=128, vocab_size=256, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def catalog(store: Path | None) -> KernelCatalog:
    """Compiled bundles from `store`, or eager modules built from the same Blueprints."""
    if store is not None:
        return KernelCatalog.from_bundles(sorted((store / "kernels").iterdir()))
    cat = KernelCatalog()
    for doc in load_documents((HERE / "blueprints.yaml").read_bytes()):
        graph = validate_source({"template": doc["spec"]["template"]})
        cat.add(doc["metadata"]["name"], lambda g=graph: build_module(g, seed=0))
    return cat


def resolver(cat: KernelCatalog) -> Callable[[str], nn.Module]:
    """Rebuilds a seed kernel from its key (for reloading a checkpoint)."""

    def resolve(key: str) -> nn.Module:
        entry = next(e for e in cat.ranked() if e.key == key)
        if isinstance(entry.source, Path):
            return load_kernel(entry.source, entry.sha256)
        return EagerKernel(entry.source(), key)  # type: ignore[operator]

    return resolve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, help="a store with the compiled Blueprints (default: eager seeds)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(".esper/gpt2"))
    ap.add_argument("--compare", action="store_true", help="also train the bare model with the same data")
    args = ap.parse_args()

    data = torch.tensor(list(CORPUS.read_bytes()), dtype=torch.long)
    cut = int(len(data) * 0.9)
    train, held = data[:cut], data[cut:]
    gen = torch.Generator().manual_seed(args.seed)

    def windows(src: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(src) - 64, (n,), generator=g).tolist()
        return torch.stack([src[s : s + 64] for s in starts])

    half = len(held) // 2
    val = windows(held[:half], 32, torch.Generator().manual_seed(1))  # the plateau watches this
    judge = windows(held[half:], 32, torch.Generator().manual_seed(2))  # seeds are judged on this

    def loss_of(m: nn.Module, x: torch.Tensor) -> float:
        was = m.training
        m.eval()
        with torch.no_grad():
            out = float(m(x, labels=x).loss)
        m.train(was)
        return out

    if args.compare:
        bare = gpt2(args.seed).train()
        bare_opt = torch.optim.AdamW(bare.parameters(), lr=3e-3)
        bare_gen = torch.Generator().manual_seed(args.seed)
        for _ in range(args.steps):
            x = windows(train, 8, bare_gen)
            bare(x, labels=x).loss.backward()
            bare_opt.step()
            bare_opt.zero_grad()
        print(f"bare GPT-2 after {args.steps} steps: validation loss {loss_of(bare, val):.4f}, "
              f"held-out {loss_of(bare, judge):.4f}")  # fmt: skip

    model = gpt2(args.seed)
    wrap(model, SLOTS, per_token=True, causal=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss_on(x: torch.Tensor) -> Callable[[], float]:
        return lambda: loss_of(model, x)

    cat = catalog(args.store)
    train_steps = blend_steps = max(20, args.steps // 6)
    policy = PlateauPolicy.for_language_model(
        catalog=cat, evaluate=loss_on(val), contribution=loss_on(judge), model=model, optimizer=opt,
        group_options={"lr": 3e-3}, train_steps=train_steps, blend_steps=blend_steps, patience=2,
    )  # fmt: skip
    model.train()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = windows(train, 8, gen)
        model(x, labels=x).loss.backward()
        opt.step()
        policy.step()
        opt.zero_grad()
        if step % 25 == 0:
            v = loss_on(val)()
            policy.on_eval(v, step)
            if step % 100 == 0:
                states = ", ".join(s.state.value for s in slots(model).values())
                print(f"step {step}: validation loss {v:.4f}; slots {states}", flush=True)
    seconds = time.perf_counter() - t0
    print(f"grown GPT-2 after {args.steps} steps ({seconds:.1f}s): validation loss {loss_on(val)():.4f}, "
          f"held-out {loss_on(judge)():.4f}")  # fmt: skip
    for e in policy.events:
        print("  ", e)
    print("slots:", {n: s.state.value for n, s in slots(model).items()})

    model.eval()
    prompt = torch.tensor([list(b"The operator ")])
    out = model.generate(prompt, max_new_tokens=48, do_sample=False, use_cache=True)
    print("generated (KV cache):", bytes(out[0].tolist()).decode(errors="replace"))

    from transformers import GPT2LMHeadModel

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out / "grown")
    back = from_pretrained(GPT2LMHeadModel, args.out / "grown", kernel_resolver=resolver(cat)).eval()
    with torch.no_grad():
        want = model(val).logits
        print("reloaded: max |logit difference|", float((back(val).logits - want).abs().max()))
    for s in slots(model).values():
        if s.state.value == "blending":
            s.fossilize(reason="export")
    plain = unwrap(copy.deepcopy(model))
    with torch.no_grad():
        want = model(val).logits
        print("exported: max |logit difference|", float((plain(val).logits - want).abs().max()))
    left = sorted({type(m).__name__ for m in plain.modules() if type(m).__module__.startswith("esper")})
    print("Esper classes left in the export:", left or "none")
    torch.save(plain, args.out / "plain.pt")

    torch._dynamo.reset()
    grown = torch._dynamo.explain(model)(val[:2])
    torch._dynamo.reset()
    bare = torch._dynamo.explain(gpt2(args.seed).eval())(val[:2])
    print(f"torch.compile graph breaks: grown {grown.graph_break_count}, bare GPT-2 {bare.graph_break_count}")
    step_slots(model)  # (a no-op here: shows the per-step call a trainer without the policy makes)


if __name__ == "__main__":
    main()
