"""A small GPT-2 from transformers (random init, no downloads) and byte-level text from the repository.

The text is `examples/data/corpus.txt` (two of the project's own docs); bytes are tokens, so the
vocabulary is 256 and nothing is tokenized or fetched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "data" / "corpus.txt"
EMBED, LAYERS, HEADS, VOCAB = 64, 4, 4, 256
SLOTS = ("transformer.h.1.mlp", "transformer.h.3.mlp")


def config() -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=LAYERS, n_embd=EMBED, n_head=HEADS, n_positions=128, vocab_size=VOCAB,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip


def gpt2(seed: int = 0) -> Any:
    """A fresh 4-layer, width-64 GPT-2 language model, initialized from `seed`."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config())


def corpus() -> torch.Tensor:
    """The corpus as a 1-D tensor of byte values (int64)."""
    return torch.tensor(list(CORPUS.read_bytes()), dtype=torch.long)


def splits(held_out: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) bytes: the last `held_out` of the corpus is validation."""
    data = corpus()
    cut = int(len(data) * (1 - held_out))
    return data[:cut], data[cut:]


def batch(data: torch.Tensor, size: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """`size` random windows of `seq` bytes."""
    starts = torch.randint(0, len(data) - seq, (size,), generator=gen)
    return torch.stack([data[s : s + seq] for s in starts.tolist()])
