"""Helpers for draft-model tests: tiny random Llama / Qwen3 targets and batches with their features."""

from __future__ import annotations

import torch

from deepspec.config import draft_model_config
from deepspec.data.sequences import TokenizedSequence, token_frequencies
from deepspec.models import build_draft
from deepspec.models.draft import DraftBatch
from deepspec.testing.tiny import tiny_target

ALGORITHMS = ["eagle3", "dflash", "dspark"]
ARCHS = ["llama", "qwen3"]


def make_target(arch: str = "llama"):
    return tiny_target(arch, layer_ids=[0, 1, 2])


def make_draft(algorithm: str, target, **overrides):
    kw = {"algorithm": algorithm}
    if algorithm != "eagle3":
        kw["num_layers"] = 2
    if algorithm == "dspark":
        kw["markov_rank"] = 16
    kw.update(overrides)
    torch.manual_seed(1)
    return build_draft(draft_model_config(**kw), target)


def batch_token_counts(batch: DraftBatch, vocab_size: int) -> torch.Tensor:
    """Supervised-token counts of a batch, through the trainer's own counter."""
    rows = [
        TokenizedSequence(str(i), batch.input_ids[i], batch.loss_mask[i]) for i in range(len(batch.input_ids))
    ]
    return token_frequencies(rows, vocab_size)


def make_batch(target, batch: int = 2, seq: int = 24, seed: int = 0, pad: bool = True) -> DraftBatch:
    """Random tokens; the second row right-padded; tokens 6.. supervised (a prompt of 6 tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, target.vocab_size, (batch, seq), generator=g)
    attn = torch.ones(batch, seq, dtype=torch.long)
    if pad and batch > 1:
        attn[1, seq - 5 :] = 0
        ids[1, seq - 5 :] = 0
    loss_mask = torch.zeros(batch, seq, dtype=torch.long)
    loss_mask[:, 6:] = 1
    loss_mask &= attn
    out = target.capture(ids, attn)
    return DraftBatch(ids, attn, loss_mask, out.features, out.last_hidden)
