"""The decode core on CPU: row cache steps give the logits of a full forward, whatever the rows do."""

from __future__ import annotations

import torch

from deepspec.decode import DecodeCore
from deepspec.decode.core import kv_bucket
from deepspec.decode.sampling import inverse_cdf, verify_rows
from deepspec.testing.tiny import tiny_target


@torch.no_grad()
def full_logits(target, ids: list[int]) -> torch.Tensor:
    return target.model(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def test_rows_advance_independently_and_match_full_forward():
    target = tiny_target("qwen3")
    core = DecodeCore(target, rows=3, max_len=64)
    seqs = [[1, 5, 9, 17], [2, 3], [4, 8, 15, 16, 23, 42]]
    # prefill rows 2 and 0 (scattered rows, right-padded batch), then row 1 alone
    logits, feats = core.prefill([2, 0], [torch.tensor(seqs[2]), torch.tensor(seqs[0])])
    assert torch.allclose(logits[0], full_logits(target, seqs[2])[-1], atol=1e-4)
    assert feats[1].shape == (4, len(target.layer_ids) * target.hidden_size)
    core.prefill([1], [torch.tensor(seqs[1])])
    # one step of 3 tokens per row at each row's own position, with rejected junk left behind
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        if step == 2:  # growing the cache keeps what the rows hold
            core.resize(4, 128)
            assert (core.rows, core.max_len, core.cache.keys[0].shape[2]) == (4, 128, 128)
        new = torch.randint(0, target.vocab_size, (3, 3), generator=gen)
        pos = torch.tensor([len(s) for s in seqs])[:, None] + torch.arange(3)
        out = core.step(new, pos, needed=max(len(s) for s in seqs) + 3)
        for b in range(3):
            want = full_logits(target, seqs[b] + new[b].tolist())[-3:]
            assert torch.allclose(out.logits[b].float(), want, atol=1e-4), (step, b)
            seqs[b] += new[b, : 1 + (b + step) % 3].tolist()  # keep 1..3 of the 3 tokens: "crop" the rest


def test_kv_bucket():
    assert [kv_bucket(n, 3000) for n in (1, 256, 257, 2049)] == [256, 256, 512, 3000]


def test_verify_rows_greedy_and_padding():
    logits = torch.full((2, 4, 5), -10.0)
    logits[:, :, 2] = 10.0  # the target always wants token 2
    draft = torch.tensor([[2, 2, 1], [2, 2, 2]])
    acc, nxt = verify_rows(draft, torch.tensor([3, 2]), None, logits, 0.0, None)
    assert acc.tolist() == [2, 2] and nxt.tolist() == [2, 2]  # row 1: slot 3 is padding


def test_inverse_cdf_never_picks_zero_mass():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]]).expand(64, 4)
    tokens = inverse_cdf(probs, torch.linspace(0, 0.999999, 64))
    assert set(tokens.tolist()) == {1, 3}
