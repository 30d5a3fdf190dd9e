"""DFlash: block attention mask vs brute force, training blocks == inference blocks, anchors, prefix loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from deepspec.models.dflash import build_block_mask, default_mask_token_id, sample_anchors

from .draft_helpers import make_batch, make_draft


def brute_force_block_mask(anchors: torch.Tensor, seq_len: int, g: int) -> torch.Tensor:
    b, n = anchors.shape
    mask = torch.zeros(b, n * g, seq_len + n * g, dtype=torch.bool)
    for bi in range(b):
        for blk in range(n):
            a = int(anchors[bi, blk])
            for slot in range(g):
                qi = blk * g + slot
                for pos in range(seq_len):  # context strictly before the anchor
                    mask[bi, qi, pos] = pos < a
                for other in range(g):  # bidirectional within the own block only
                    mask[bi, qi, seq_len + blk * g + other] = True
    return mask


def test_block_mask_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    for b, n, t, gamma in [(1, 1, 5, 3), (2, 4, 17, 7), (3, 6, 30, 4)]:
        anchors = torch.randint(0, t, (b, n), generator=g)
        assert torch.equal(build_block_mask(anchors, t, gamma), brute_force_block_mask(anchors, t, gamma))


def test_training_blocks_equal_inference_blocks(target):
    """One packed training pass gives, for every anchor, the logits the drafter computes from scratch."""
    draft = make_draft("dflash", target).eval()
    batch = make_batch(target, batch=1, seq=20, pad=False)
    ids, feats = batch.input_ids[0], batch.features[0]
    anchors = torch.tensor([[0, 3, 7, 8, 15]])
    with torch.no_grad():
        out = draft.block_forward(batch, anchors, torch.ones_like(anchors, dtype=torch.bool))
        train_logits = draft.target_lm_head(out.hidden[0])  # [N, g, V]
    drafter = draft.as_drafter(target)
    for n, a in enumerate(anchors[0].tolist()):
        drafter.reset()
        drafter.extend(ids[:a], feats[:a])  # context strictly before the anchor
        torch.testing.assert_close(train_logits[n], drafter.block_logits(int(ids[a])), rtol=1e-4, atol=1e-4)
    # labels: slot k predicts anchor + k + 1
    assert out.labels[0, 1].tolist() == ids[4:11].tolist()


def test_sample_anchors_are_supervised_and_capped():
    sup = torch.zeros(3, 12, dtype=torch.bool)
    sup[0, 4:] = True
    sup[1, 9:11] = True
    torch.manual_seed(0)
    anchors, valid = sample_anchors(sup, num_anchors=5)
    assert anchors.shape == (3, 5)
    assert valid.sum(1).tolist() == [5, 2, 0]
    for bi in range(3):
        picked = anchors[bi][valid[bi]]
        assert len(set(picked.tolist())) == len(picked)  # without replacement
        assert all(sup[bi, a + 1] for a in picked.tolist())  # the anchor's next token is supervised
        assert picked.tolist() == sorted(picked.tolist())
    anchors, valid = sample_anchors(sup, num_anchors=512)
    assert anchors.shape[1] == 8  # capped by the most supervised positions in a row


def test_loss_is_decayed_ce_on_the_supervised_prefix(llama_target):
    target = llama_target
    draft = make_draft("dflash", target, loss_decay=4.0)
    batch = make_batch(target, batch=1, seq=20, pad=False)
    batch.loss_mask[0, 12] = 0  # a hole: blocks crossing token 12 stop counting there
    anchors = torch.tensor([[5, 9, 16]])
    out = draft(batch, anchors=anchors)
    fwd = draft.block_forward(batch, anchors, torch.ones_like(anchors, dtype=torch.bool))
    logits = draft.target_lm_head(fwd.hidden[0]).float()
    ids = batch.input_ids[0]
    num = den = 0.0
    expected_valid = []
    for n, a in enumerate(anchors[0].tolist()):
        row = []
        for k in range(7):
            targets = range(a + 1, a + k + 2)
            ok = all(p < 20 and batch.loss_mask[0, p] for p in targets)
            row.append(ok)
            if ok:
                w = math.exp(-k / 4.0)
                num = num + w * F.cross_entropy(logits[n, k][None], ids[a + k + 1][None])
                den += w
        expected_valid.append(row)
    assert fwd.valid[0].tolist() == expected_valid
    assert expected_valid[0] == [True, True, True, True, True, True, False]  # 6..11 ok, 12 is the hole
    assert expected_valid[1] == [True, True] + [False] * 5
    assert expected_valid[2] == [True, True, True] + [False] * 4  # the sequence ends at 19
    torch.testing.assert_close(out.loss, num / den, rtol=1e-5, atol=1e-6)


def test_padded_anchors_do_not_count(llama_target):
    draft = make_draft("dflash", llama_target)
    batch = make_batch(llama_target)
    anchors = torch.tensor([[7, 8], [7, 0]])
    valid = torch.tensor([[True, True], [True, False]])
    a = draft(batch, anchors=anchors, anchor_valid=valid).loss
    b = draft(batch, anchors=torch.tensor([[7, 8], [7, 3]]), anchor_valid=valid).loss
    torch.testing.assert_close(a, b)


def test_mask_token_defaults_to_a_reserved_id(llama_target):
    cfg = llama_target.config
    assert default_mask_token_id(cfg) == cfg.pad_token_id == 0  # tiny models: pad is distinct from bos/eos
    draft = make_draft("dflash", llama_target)
    assert draft.draft_config()["mask_token_id"] == 0


def test_engine_slot_convention(llama_target):
    """DFlash: block [anchor, mask x (B-1)], slot 0 unused, mask slot j predicts the token at anchor+j."""
    draft = make_draft("dflash", llama_target, block_size=5).eval()
    assert draft.proposals_per_block == 4 and draft.slot_convention == "mask slot j predicts anchor+j"
    batch = make_batch(llama_target, batch=1, seq=20, pad=False)
    ids = batch.input_ids[0]
    anchors = torch.tensor([[9]])
    with torch.no_grad():
        out = draft.block_forward(batch, anchors, torch.ones_like(anchors, dtype=torch.bool))
        # the whole block by hand: slots 0..4 at positions 9..13, context = positions 0..8
        h = draft.embed(torch.tensor([[int(ids[9])] + [draft.mask_token_id] * 4]))
        rope_q = draft.rotary(torch.arange(9, 14))
        ctx = draft.context(batch.features[:, :9])
        rope_c = draft.rotary(torch.arange(9))
        for layer in draft.layers:
            h = layer(h, rope_q, layer.self_attn.project_kv(ctx, *rope_c), None)
        full = draft.norm(h)[0]
    torch.testing.assert_close(out.hidden[0, 0], full[1:])  # predictions come from mask slots 1..4
    assert out.labels[0, 0].tolist() == ids[10:14].tolist()  # slot j -> the token at anchor + j
    dspark = make_draft("dspark", llama_target, block_size=5)
    assert dspark.proposals_per_block == 5 and dspark.slot_convention == "slot k predicts anchor+k+1"
