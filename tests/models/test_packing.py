"""Sequence packing (``training.packing``): several sequences in one row, position ids restarting at 0,
attention inside each sequence, in the target's forward and in every draft.

A packed micro-batch must give each algorithm the same loss and per-position acceptance as the same
sequences right-padded one per row, and a sequence's result must not depend on its neighbours.
DFlash/DSpark anchors are passed explicitly (the same anchors, shifted by each sequence's offset in its
row), so the comparison is exact; the packed anchor sampler is tested on its own.
"""

from __future__ import annotations

import pytest
import torch

from deepspec.data.sequences import PackedShape, TokenizedSequence, pack_batch
from deepspec.models.dflash import build_block_mask, sample_anchors
from deepspec.models.draft import DraftBatch, packed_causal_mask
from deepspec.train.features import OnlineFeatures

from .draft_helpers import ALGORITHMS, make_draft


def _sequence(target, length: int, seed: int, prompt: int = 4) -> TokenizedSequence:
    """Random tokens, supervised after a ``prompt`` of unsupervised ones."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, target.vocab_size, (length,), generator=g)
    mask = torch.zeros(length, dtype=torch.long)
    mask[prompt:] = 1
    return TokenizedSequence(f"s{seed}", ids, mask)


def _padded(target, seqs: list[TokenizedSequence]) -> DraftBatch:
    """One sequence per row, right-padded, through the target (the trainer's unpacked path)."""
    return OnlineFeatures(target, seqs).batch(list(range(len(seqs))))


def _packed(target, rows: list[list[TokenizedSequence]], shape: PackedShape) -> DraftBatch:
    """Packed rows through the target (the trainer's packed path)."""
    flat = [s for row in rows for s in row]
    index_rows, at = [], 0
    for row in rows:
        index_rows.append(list(range(at, at + len(row))))
        at += len(row)
    return OnlineFeatures(target, flat).packed_batch(index_rows, shape)


def _anchors(per_sequence: list[list[int]], offsets: list[list[int]], rows: int) -> tuple[torch.Tensor, ...]:
    """Anchors [rows, N] + valid from per-sequence anchor lists placed at the given row offsets.

    ``offsets[r]`` lists, for each sequence of row r, its index into ``per_sequence`` and its start."""
    placed = [[a + start for i, start in row for a in per_sequence[i]] for row in offsets]
    n = max(len(p) for p in placed)
    anchors = torch.zeros(rows, n, dtype=torch.long)
    valid = torch.zeros(rows, n, dtype=torch.bool)
    for r, p in enumerate(placed):
        anchors[r, : len(p)] = torch.tensor(p, dtype=torch.long)
        valid[r, : len(p)] = True
    return anchors, valid


def _run(draft, batch: DraftBatch, anchors=None):
    if draft.algorithm == "eagle3":
        return draft(batch)
    return draft(batch, *anchors)


# --------------------------------------------------------------------------------------------------
# Layout and the target
# --------------------------------------------------------------------------------------------------


def test_pack_batch_layout(llama_target):
    a, b, c = (_sequence(llama_target, n, s) for n, s in ((5, 1), (3, 2), (6, 3)))
    out = pack_batch([[a, b], [c]], PackedShape(rows=3, row_length=8))
    assert out["input_ids"].shape == (2, 8)  # the fixed row length; no all-padding third row
    assert out["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert out["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]  # the unfilled end: its own segment
    assert out["attention_mask"].sum(1).tolist() == [8, 6]
    assert torch.equal(out["input_ids"][0, 5:], b.input_ids)
    assert torch.equal(out["loss_mask"][1, :6], c.loss_mask)
    with pytest.raises(ValueError, match="rows do not fit"):
        pack_batch([[a], [b], [c]], PackedShape(rows=2, row_length=8))


def test_target_features_of_a_packed_row_equal_each_sequence_alone(target):
    """transformers keeps the target's attention inside each sequence from the position ids alone."""
    seqs = [_sequence(target, n, s) for n, s in ((7, 1), (5, 2), (9, 3))]
    packed = _packed(target, [[seqs[0], seqs[1]], [seqs[2]]], PackedShape(2, 14))
    starts = [(0, 0), (0, 7), (1, 0)]
    for s, (row, at) in zip(seqs, starts, strict=True):
        alone = target.capture(s.input_ids[None])
        n = s.input_ids.numel()
        torch.testing.assert_close(packed.features[row, at : at + n], alone.features[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            packed.target_last_hidden[row, at : at + n], alone.last_hidden[0], rtol=1e-5, atol=1e-5
        )


def test_packed_causal_mask_is_block_diagonal():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = packed_causal_mask(pos)[0, 0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for lo, hi in ((0, 3), (3, 5), (5, 6)):
        expected[lo:hi, lo:hi] = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
    assert torch.equal(mask, expected)


def test_block_mask_context_starts_at_the_anchors_sequence():
    anchors = torch.tensor([[2, 6]])
    mask = build_block_mask(anchors, 8, 2, starts=torch.tensor([[0, 4]]))[0, :, :8]
    assert mask[0].tolist() == [True, True] + [False] * 6  # anchor 2 of the first sequence (rows 0..3)
    assert mask[2].tolist() == [False] * 4 + [True, True, False, False]  # anchor 6: context 4..5 only


# --------------------------------------------------------------------------------------------------
# Every draft: packed == padded, and neighbours do not matter
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_packed_loss_and_acceptance_equal_padded(target, algorithm):
    # s1 and s3 are supervised from their first token: a shifted target or a block label that ran past the
    # end of s0 / s2 would land on a supervised token of the neighbour
    seqs = [_sequence(target, n, s, p) for n, s, p in ((13, 1, 4), (9, 2, 0), (17, 3, 4), (6, 4, 0))]
    draft = make_draft(algorithm, target)
    # rows: [s0 | s1] (22 tokens), [s2 | s3] (23 tokens), row length 24: s1 and s3 attend after a neighbour
    shape = PackedShape(rows=2, row_length=24)
    packed = _packed(target, [[seqs[0], seqs[1]], [seqs[2], seqs[3]]], shape)
    padded = _padded(target, seqs)
    assert packed.input_ids.shape == (2, 24) and padded.input_ids.shape == (4, 17)
    per_sequence = [[3, 5, 9], [3, 6], [4, 10, 14], [4]]  # anchors whose next token is supervised
    un_anchors = _anchors(per_sequence, [[(i, 0)] for i in range(4)], 4)
    pk_anchors = _anchors(per_sequence, [[(0, 0), (1, 13)], [(2, 0), (3, 17)]], 2)
    a = _run(draft, padded, un_anchors)
    b = _run(draft, packed, pk_anchors)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    assert a.position_acceptance is not None and b.position_acceptance is not None
    torch.testing.assert_close(b.position_acceptance, a.position_acceptance, rtol=1e-5, atol=1e-6)
    for key in a.metrics:
        assert b.metrics[key] == pytest.approx(a.metrics[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_sequence_does_not_see_its_neighbour(llama_target, algorithm):
    """The loss of sequence A (the only supervised one) is the same whichever sequence precedes it."""
    target = llama_target
    a = _sequence(target, 11, 7)
    draft = make_draft(algorithm, target)
    losses = []
    for seed, length in ((8, 9), (9, 12)):
        neighbour = _sequence(target, length, seed)
        neighbour.loss_mask.zero_()  # only A's predictions are in the loss
        batch = _packed(target, [[neighbour, a]], PackedShape(rows=1, row_length=24))
        anchors = _anchors([[3, 6, 8]], [[(0, length)]], 1)
        losses.append(_run(draft, batch, anchors).loss)
    alone = _run(draft, _padded(target, [a]), _anchors([[3, 6, 8]], [[(0, 0)]], 1)).loss
    torch.testing.assert_close(losses[0], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[1], alone, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Anchors per sequence
# --------------------------------------------------------------------------------------------------


def test_packed_anchors_are_sampled_per_sequence():
    # row: sequence 0 at 0..9 (supervised from 2), sequence 1 at 10..15 (supervised from 11), padding 16..19
    pos = torch.tensor([list(range(10)) + list(range(6)) + list(range(4))])
    sup = torch.zeros(1, 20, dtype=torch.bool)
    sup[0, 2:10] = True
    sup[0, 11:16] = True
    seg = DraftBatch(
        pos, sup.long(), sup.long(), torch.zeros(1, 20, 1), torch.zeros(1, 20, 1), pos
    ).segments()
    torch.manual_seed(0)
    for _ in range(20):
        anchors, valid = sample_anchors(sup, 3, seg)
        chosen = anchors[valid].tolist()
        assert chosen == sorted(chosen)
        first = [a for a in chosen if a < 10]
        second = [a for a in chosen if a >= 10]
        assert len(first) == 3 and len(second) == 3  # num_anchors per sequence, not per row
        assert all(1 <= a <= 8 for a in first)  # next token supervised and inside sequence 0 (9 is its last)
        assert all(10 <= a <= 14 for a in second)
    few, few_valid = sample_anchors(sup, 100, seg)  # fewer eligible positions than asked: all of them
    assert few[few_valid].tolist() == list(range(1, 9)) + list(range(10, 15))


def test_a_target_that_ignores_packed_positions_is_refused(llama_target):
    """Packing needs the target's forward to honour packed position ids; an eager-mask target that
    ignores them (simulated by dropping position_ids) must be refused with what to do."""
    seqs = [_sequence(llama_target, 20, s) for s in (1, 2)]
    OnlineFeatures(llama_target, seqs).check_packing()  # transformers' Llama honours them

    class IgnoresPositions:
        def __init__(self, target):
            self.target = target

        def __getattr__(self, name):
            return getattr(self.target, name)

        def capture(self, input_ids, attention_mask=None, position_ids=None):
            return self.target.capture(input_ids, attention_mask)  # one causal sequence per row

    with pytest.raises(ValueError, match=r"training\.packing: false.*features\.mode: offline"):
        OnlineFeatures(IgnoresPositions(llama_target), seqs).check_packing()
