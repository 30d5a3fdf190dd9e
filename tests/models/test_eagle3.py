"""Eagle3: the efficient TTT unroll equals an explicit step-by-step loop; reduced vocabulary; loss alignment."""

from __future__ import annotations

import math

import pytest
import torch

from deepspec.models.eagle3 import build_vocab_mapping, ttt_attention

from .draft_helpers import batch_token_counts, make_batch, make_draft


def test_ttt_attention_equals_dense_attention_over_explicit_keys():
    torch.manual_seed(0)
    b, h, hkv, t, d, steps = 2, 4, 2, 9, 8, 3
    q = torch.randn(b, h, t, d)
    ks = [torch.randn(b, hkv, t, d) for _ in range(steps + 1)]
    vs = [torch.randn(b, hkv, t, d) for _ in range(steps + 1)]
    got = ttt_attention(q, ks[0], vs[0], ks[1:], vs[1:])
    # brute force: every query j over keys {step 0, i <= j} U {step s, j} for s = 1..steps
    ref = torch.empty_like(got)
    for bi in range(b):
        for hi in range(h):
            g = hi // (h // hkv)
            for j in range(t):
                keys = [ks[0][bi, g, i] for i in range(j + 1)] + [
                    ks[s][bi, g, j] for s in range(1, steps + 1)
                ]
                vals = [vs[0][bi, g, i] for i in range(j + 1)] + [
                    vs[s][bi, g, j] for s in range(1, steps + 1)
                ]
                w = torch.softmax(torch.stack(keys) @ q[bi, hi, j] / math.sqrt(d), dim=0)
                ref[bi, hi, j] = w @ torch.stack(vals)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_unroll_equals_explicit_step_by_step_loop(target):
    """Training's batched unroll == the inference drafter run position by position, fed the same tokens."""
    steps = 4
    draft = make_draft("eagle3", target, ttt_steps=steps).eval()
    batch = make_batch(target, batch=1, seq=14, pad=False)
    ids, feats = batch.input_ids[0], batch.features[0]
    with torch.no_grad():
        outs = draft.unroll(batch.input_ids, batch.features, steps)
        fast = torch.stack([draft.logits(o)[0] for o in outs], dim=1)  # [T, steps, Vd]
    drafter = draft.as_drafter(target)
    t = ids.numel()
    for j in range(t - steps - 1):
        drafter.reset()
        drafter.extend(ids[: j + 1], feats[: j + 1])  # pairs < j cached, f_j pending
        slow = drafter.teacher_forced_logits(int(ids[j + 1]), ids[j + 2 : j + 2 + steps].tolist())
        torch.testing.assert_close(fast[j], slow, rtol=1e-4, atol=1e-4, msg=f"pair {j}")


def test_loss_matches_hand_computed_soft_cross_entropy(llama_target):
    """Step k at pair j: soft CE against the target distribution at j+1+k, on supervised tokens j+2+k only."""
    target = llama_target
    steps = 3
    draft = make_draft("eagle3", target, ttt_steps=steps, ttt_decay=0.8)
    batch = make_batch(target, batch=2, seq=16)
    out = draft(batch)
    with torch.no_grad():
        outs = draft.unroll(batch.input_ids, batch.features, steps)
        p_t = torch.softmax(target.compute_logits(batch.target_last_hidden), -1)  # [B, T, V]
    sup = batch.loss_mask.bool() & batch.attention_mask.bool()
    total = 0.0
    b, t = batch.input_ids.shape
    for k in range(steps):
        logp = torch.log_softmax(draft.logits(outs[k]), -1)
        terms = [
            -(p_t[bi, j + 1 + k] * logp[bi, j]).sum()
            for bi in range(b)
            for j in range(t)
            if j + 2 + k < t and sup[bi, j + 2 + k]
        ]
        total = total + 0.8**k * torch.stack(terms).mean()
    torch.testing.assert_close(out.loss, total, rtol=1e-5, atol=1e-5)
    # a prompt-only batch has nothing to supervise: loss 0, no NaN
    batch.loss_mask.zero_()
    assert draft(batch).loss.item() == 0.0


def test_build_vocab_mapping():
    counts = torch.tensor([5, 0, 9, 9, 1, 7, 0, 3])
    d2t, t2d = build_vocab_mapping(counts, 4)
    ids = torch.arange(4) + d2t
    assert ids.tolist() == [0, 2, 3, 5]  # the 4 most frequent, sorted by target id
    assert d2t.tolist() == [0, 1, 1, 2]
    assert t2d.tolist() == [True, False, True, True, False, True, False, False]
    d2t, _ = build_vocab_mapping(torch.zeros(8), 3)  # ties -> lowest ids
    assert (torch.arange(3) + d2t).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="draft_vocab_size"):
        build_vocab_mapping(counts, 9)


def test_reduced_vocabulary_draft(llama_target):
    target = llama_target
    batch = make_batch(target)
    counts = batch_token_counts(batch, target.vocab_size)
    assert counts.sum() == batch.loss_mask.sum()
    draft = make_draft("eagle3", target, draft_vocab_size=32)
    draft.set_vocab_mapping(*build_vocab_mapping(counts, 32))
    ids = draft.draft_ids
    assert draft.lm_head.weight.shape == (32, target.hidden_size)
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight[ids])  # initialised from the target's rows
    out = draft(batch)
    assert torch.isfinite(out.loss)
    drafter = draft.eval().as_drafter(target)
    drafter.extend(batch.input_ids[0, :10], batch.features[0, :10])
    for temp in (0.0, 1.0):
        p = drafter.propose(int(batch.input_ids[0, 10]), 5, temp, torch.Generator().manual_seed(0))
        assert p.probs.shape == (5, target.vocab_size)
        assert torch.all(draft.t2d[p.tokens])  # proposals are in the draft vocabulary
        assert torch.all(p.probs[:, ~draft.t2d] == 0)  # no mass outside it
        assert torch.allclose(p.probs.sum(-1), torch.ones(5), atol=1e-5)
    with pytest.raises(ValueError, match="inconsistent"):
        draft.set_vocab_mapping(
            torch.zeros(32, dtype=torch.long), torch.ones(target.vocab_size, dtype=torch.bool)
        )


def test_eagle3_has_one_layer(llama_target):
    with pytest.raises(ValueError, match="num_layers must be 1"):
        make_draft("eagle3", llama_target, num_layers=2)
