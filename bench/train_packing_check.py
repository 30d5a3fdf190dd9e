"""On-device check of ``training.packing``: one packed micro-batch gives the same loss as the same
sequences right-padded one per row, through the trainer's own target, features and draft.

This is the GPU check of the packed attention masks: the target's packed ``position_ids`` path
(transformers' packed-sequence mask) and, for DFlash/DSpark on CUDA, the flex-attention BlockMask whose
context starts at each anchor's sequence (``block_flex_mask(..., starts)``), which the CPU tests never
run. DFlash/DSpark anchors are sampled once on the padded layout and placed at each sequence's offset in
its packed row, so both layouts run exactly the same blocks.

Tolerances (relative on the loss and the metrics, absolute on per-position acceptance):

* fp32 (CPU): 1e-4. The two layouts run the same arithmetic on different shapes; fp32 reduction order
  moves a loss near 1-10 by about 1e-6 (the CPU tests hold 1e-5).
* bf16 autocast (CUDA): 2e-2. bf16 keeps 8 significant bits (rounding 2^-9 ~ 2e-3 per operation), and the
  padded and packed micro-batches take different kernels (padding mask vs packed mask in a 30-layer target,
  flex vs SDPA blocks of other shapes), so each feature differs by a few bf16 roundings. The loss averages
  thousands of supervised positions, so those differences mostly cancel and it moves by well under 1 %.
  What the check must catch is a mask that lets a sequence see its neighbour: the check also runs the
  packed micro-batch with the packing information dropped (``position_ids=None``: each row one long
  sequence) and reports how far that moves the loss (``control_rel``), to show the tolerance sits well
  below the error it is meant to find.

Bench scripts must not import ``tests/``: the anchor placement here mirrors ``tests/models/test_packing.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

#: per dtype: (relative tolerance on the loss and metrics, absolute tolerance on per-position acceptance,
#: relative (Frobenius) tolerance on the hidden states of all compared predictions)
TOLERANCE = {torch.float32: (1e-4, 1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2, 3e-2)}


def placed_anchors(
    per_sequence: list[list[int]], starts: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors [rows, N] and valid [rows, N] from per-sequence anchor lists: row r holds the anchors of
    its sequences ``k`` shifted by ``starts[r][j]`` (``per_sequence`` is indexed in row order)."""
    placed, k = [], 0
    for row in starts:
        placed.append([a + start for j, start in enumerate(row) for a in per_sequence[k + j]])
        k += len(row)
    n = max(1, max(len(p) for p in placed))
    anchors = torch.zeros(len(placed), n, dtype=torch.long)
    valid = torch.zeros(len(placed), n, dtype=torch.bool)
    for r, p in enumerate(placed):
        anchors[r, : len(p)] = torch.tensor(p, dtype=torch.long)
        valid[r, : len(p)] = True
    return anchors.to(device), valid.to(device)


def shared_rows(micro_batches: list[list[list[int]]], rows: int) -> list[list[int]]:
    """A micro-batch of at most ``rows`` rows from a step's packed micro-batches, rows that hold several
    sequences first (the first micro-batch alone may hold only long sequences, one per row)."""
    every = [row for micro in micro_batches for row in micro]
    return sorted(every, key=lambda row: len(row) < 2)[:rows]  # stable: the sampler's order otherwise


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(b), 1e-6)


def _relative(x: torch.Tensor, reference: torch.Tensor) -> float:
    """||x - reference|| / ||reference|| (Frobenius, fp32)."""
    x, reference = x.float(), reference.float()
    return float((x - reference).norm() / reference.norm().clamp_min(1e-12))


def _eagle3_hidden(draft: Any, batch: Any, packed: bool) -> list[torch.Tensor]:
    """Eagle3's unrolled hidden states of every TTT step (packed: honouring the batch's position ids)."""
    position_ids = batch.position_ids if packed else None
    return draft.unroll(batch.input_ids, batch.features, draft.cfg.ttt_steps, position_ids)


def _gather_eagle3(outs: list[torch.Tensor], placement: list[tuple[int, int, int]]) -> torch.Tensor:
    """Each sequence's hidden states, [sum, H]: ``placement`` gives (row, start, length) per sequence.

    Step k at position j reads token j+1+k, so only positions j < length-1-k are the sequence's own."""
    parts = [
        out[r, s : s + n - 1 - k] for k, out in enumerate(outs) for r, s, n in placement if n - 1 - k > 0
    ]
    return torch.cat(parts)


def _gather_blocks(
    blocks: Any, placement: list[tuple[int, int, int]], valid: list[torch.Tensor]
) -> torch.Tensor:
    """DFlash/DSpark block hidden states of each sequence's anchors, [sum, H]: ``placement`` gives (row,
    first anchor slot, anchors) per sequence; ``valid`` its supervised slots [anchors, P]."""
    return torch.cat([blocks.hidden[r, a : a + n][v] for (r, a, n), v in zip(placement, valid, strict=True)])


def check_packing(trainer: Any, seed: int = 0) -> dict[str, Any]:
    """Compare a packed micro-batch of ``trainer`` (built with ``training.packing``) with the same
    sequences padded: the draft's hidden states of every supervised prediction, the loss, the metrics and
    the per-position acceptance. Returns a JSON-able record with ``passed``.

    The hidden states carry the check: with a randomly initialised draft the loss is nearly that of a
    uniform guess, so a sequence that sees its neighbour barely moves it (measured on the tiny target:
    7e-5 relative for Eagle3), while its hidden states move by tens of percent."""
    from deepspec.data.sequences import PackedShape, pack_rows
    from deepspec.models.dflash import sample_anchors

    if trainer.packed_shape is None:
        raise ValueError("check_packing needs a trainer built with training.packing")
    features, draft, shape = trainer.features, trainer.draft, trainer.packed_shape
    micro_batches = trainer.sampler.next_packed_global_batch()
    rows = shared_rows(micro_batches, shape.rows)
    if all(len(row) < 2 for row in rows):  # lengths too alike to share a row: rows twice as long
        indices = [i for micro in micro_batches for row in micro for i in row]
        shape = PackedShape(shape.rows, 2 * shape.row_length)
        rows = pack_rows(indices, features.lengths, shape.row_length)[: shape.rows]
    flat = [i for row in rows for i in row]
    # each sequence's (row, first position in the row, length), in the order of ``flat``
    where = [(r, sum(features.lengths[i] for i in row[:j]), features.lengths[row[j]])
             for r, row in enumerate(rows) for j in range(len(row))]  # fmt: skip
    dtype = trainer.autocast_dtype or torch.float32
    rtol, acc_atol, hidden_tol = TOLERANCE[dtype]
    was_training = draft.training
    draft.eval()  # no dropout; the loss path is the training one
    dense_loss = dense_hidden = None
    attention = "-"
    with torch.no_grad(), trainer._autocast():
        padded = features.batch(flat)
        packed = features.packed_batch(rows, shape)
        blind = dataclasses.replace(packed, position_ids=None)  # the control: each row one long sequence
        dev = packed.input_ids.device
        if draft.algorithm == "eagle3":  # no sampled anchors: same input, same loss
            pad_args: tuple = ()
            pack_args: tuple = ()
            pad_where = [(j, 0, n) for j, (_, _, n) in enumerate(where)]
            h_pad = _gather_eagle3(_eagle3_hidden(draft, padded, False), pad_where)
            h_pack = _gather_eagle3(_eagle3_hidden(draft, packed, True), where)
            h_blind = _gather_eagle3(_eagle3_hidden(draft, packed, False), where)
        else:
            torch.manual_seed(seed)
            anchors, valid = sample_anchors(padded.supervised(), draft.cfg.num_anchors)
            per_sequence = [anchors[i][valid[i]].tolist() for i in range(len(flat))]
            starts: list[list[int]] = [[] for _ in rows]
            for r, s, _ in where:
                starts[r].append(s)
            pad_args = placed_anchors(per_sequence, [[0] for _ in flat], dev)
            pack_args = placed_anchors(per_sequence, starts, dev)
            counts = [len(a) for a in per_sequence]
            first = [sum(c for (r2, _, _), c in zip(where[:j], counts[:j], strict=True) if r2 == r)
                     for j, (r, _, _) in enumerate(where)]  # fmt: skip
            pack_where = [(r, a, n) for (r, _, _), a, n in zip(where, first, counts, strict=True)]
            pad_blocks = draft.training_blocks(padded, *pad_args)
            slots = [pad_blocks.valid[j, :n] for j, n in enumerate(counts)]
            h_pad = _gather_blocks(pad_blocks, [(j, 0, n) for j, n in enumerate(counts)], slots)
            h_pack = _gather_blocks(draft.training_blocks(packed, *pack_args), pack_where, slots)
            h_blind = _gather_blocks(draft.training_blocks(blind, *pack_args), pack_where, slots)
            uses_flex = draft._use_flex(dev)  # False too when flex failed once and fell back to SDPA
            attention = "flex" if uses_flex else "sdpa-dense"
            if uses_flex:  # the same packed blocks through the dense SDPA mask: flex mask == dense mask
                draft.attention_backend = "sdpa"
                try:
                    dense_hidden = _relative(
                        _gather_blocks(draft.training_blocks(packed, *pack_args), pack_where, slots), h_pack
                    )
                    dense_loss = float(draft(packed, *pack_args).loss)
                finally:
                    draft.attention_backend = "auto"
        a = draft(padded, *pad_args)
        b = draft(packed, *pack_args)
        control = draft(blind, *pack_args)
    draft.train(was_training)
    loss_a, loss_b, loss_c = float(a.loss), float(b.loss), float(control.loss)
    hidden_rel, control_hidden_rel = _relative(h_pack, h_pad), _relative(h_blind, h_pad)
    problems = []
    if all(len(row) < 2 for row in rows):
        problems.append(
            "no packed row holds two sequences: packing not exercised (longer rows or shorter sequences)"
        )
    if hidden_rel > hidden_tol:
        problems.append(f"hidden states packed vs padded differ by {hidden_rel:.3g} (relative)")
    if dev.type == "cuda" and attention == "sdpa-dense":
        problems.append(
            "flex attention fell back to the dense SDPA mask (see the warning above): the flex packed mask "
            "was not checked, and training would run the dense path"
        )
    if dense_hidden is not None and dense_hidden > hidden_tol:
        problems.append(f"hidden states packed flex vs packed dense mask differ by {dense_hidden:.3g}")
    if not _close(loss_b, loss_a, rtol):
        problems.append(f"loss packed {loss_b:.6f} vs padded {loss_a:.6f}")
    if dense_loss is not None and not _close(dense_loss, loss_b, rtol):
        problems.append(f"loss packed flex {loss_b:.6f} vs packed dense mask {dense_loss:.6f}")
    acc_diff = None
    if a.position_acceptance is not None and b.position_acceptance is not None:
        acc_diff = float((a.position_acceptance.float() - b.position_acceptance.float()).abs().max())
        if acc_diff > acc_atol:
            problems.append(f"per-position acceptance differs by {acc_diff:.4g}")
    for key in a.metrics:
        x, y = float(b.metrics[key]), float(a.metrics[key])
        if not _close(x, y, rtol) and abs(x - y) > acc_atol:
            problems.append(f"metric {key}: packed {x:.6g} vs padded {y:.6g}")
    return {
        "algorithm": draft.algorithm,
        "dtype": str(dtype).removeprefix("torch."),
        "attention": attention,
        "packed_rows": list(packed.input_ids.shape),
        "trainer_row_length": trainer.packed_shape.row_length,
        "padded_rows": list(padded.input_ids.shape),
        "sequences": len(flat),
        "shared_rows": sum(len(row) > 1 for row in rows),
        "compared_predictions": int(h_pad.shape[0]),
        "hidden_rel": hidden_rel,
        "hidden_tol": hidden_tol,
        "control_hidden_rel": control_hidden_rel,
        "flex_vs_dense_hidden_rel": dense_hidden,
        "padded_loss": loss_a,
        "packed_loss": loss_b,
        "packed_dense_mask_loss": dense_loss,
        "loss_rel": abs(loss_b - loss_a) / max(abs(loss_a), 1e-6),
        "loss_rtol": rtol,
        "control_loss_rel": abs(loss_c - loss_a) / max(abs(loss_a), 1e-6),
        "acceptance_max_diff": acc_diff,
        "control_exceeds_tolerance": control_hidden_rel > 2 * hidden_tol,
        "problems": problems,
        "passed": not problems,
    }


def describe(check: dict[str, Any]) -> str:
    """One line (plus the problems) for the log."""
    verdict = "CHECK PASSED" if check["passed"] else "CHECK FAILED"
    flex = check["flex_vs_dense_hidden_rel"]
    line = (
        f"{verdict} packing {check['algorithm']:<7} {check['dtype']} attention={check['attention']}: "
        f"packed {check['packed_rows']} ({check['sequences']} seqs, {check['shared_rows']} rows shared) vs "
        f"padded {check['padded_rows']}, {check['compared_predictions']} predictions: hidden rel "
        f"{check['hidden_rel']:.2e} (tol {check['hidden_tol']:.0e}; boundary-blind control "
        f"{check['control_hidden_rel']:.2e}), loss {check['packed_loss']:.5f} vs {check['padded_loss']:.5f} "
        f"(rel {check['loss_rel']:.1e}, tol {check['loss_rtol']:.0e})"
        + ("" if flex is None else f", flex vs dense mask hidden rel {flex:.2e}")
    )
    if not check["control_exceeds_tolerance"]:
        line += " [WARNING: the boundary-blind control is within 2x the tolerance: a weak check]"
    if check["problems"]:
        line += "\n    " + "\n    ".join(check["problems"])
    return line
