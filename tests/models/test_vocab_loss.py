"""The chunked LM-head loss (``common.vocab_loss``): same losses, statistics and gradients as the plain autograd
formulation whatever the chunk size, and a peak memory that no longer grows with rows x vocabulary."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deepspec.models.eagle3 import build_vocab_mapping
from deepspec.models.vocab_loss import VocabLossTerms, masked_mean, position_acceptance, vocab_loss

from .draft_helpers import batch_token_counts, make_batch, make_draft

# --------------------------------------------------------------------------------------------------
# vocab_loss against a plain autograd reference
# --------------------------------------------------------------------------------------------------


def reference_vocab_loss(heads, target_hidden, target_w, coef, labels=None, target_ids=None):
    """Unchunked: every [n, V] tensor materialised, autograd does the rest."""
    z = sum(F.linear(x, w).float() for x, w in heads)
    logp = torch.log_softmax(z, -1)
    p_d = logp.exp()
    t = F.linear(target_hidden, target_w).float()
    p_full = torch.softmax(t, -1)
    p_t = torch.softmax(t[:, target_ids], -1) if target_ids is not None else p_full
    stats = {
        "ce": F.nll_loss(logp, labels, reduction="none") if labels is not None else None,
        "soft_ce": -(p_t * logp).sum(-1),
        "l1": (p_d - p_t).abs().sum(-1),
    }
    if target_ids is None:
        tv = 0.5 * (p_d - p_full).abs().sum(-1)
    else:
        in_mass = p_full[:, target_ids].sum(-1)
        tv = 0.5 * ((p_d - p_full[:, target_ids]).abs().sum(-1) + 1.0 - in_mass)
    loss = sum((getattr(coef, k) * stats[k]).sum() for k in coef.names())
    return loss, stats, tv


def _problem(n=37, vocab=50, draft_vocab=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, r = 16, 6
    vd = draft_vocab or vocab
    x = torch.randn(n, h, generator=g, requires_grad=True)
    s = torch.randn(n, r, generator=g, requires_grad=True)
    w = torch.randn(vd, h, generator=g, requires_grad=True)  # a trainable head (Eagle3's lm_head)
    w2 = (0.3 * torch.randn(vd, r, generator=g)).requires_grad_()  # DSpark's W2
    target_w = torch.randn(vocab, h, generator=g)
    target_hidden = torch.randn(n, h, generator=g)
    labels = torch.randint(0, vd, (n,), generator=g)
    coef = VocabLossTerms(
        ce=torch.rand(n, generator=g), soft_ce=torch.rand(n, generator=g), l1=torch.rand(n, generator=g)
    )
    return x, s, w, w2, target_w, target_hidden, labels, coef


@pytest.mark.parametrize("chunk_rows", [1, 5, 37, 1000])
@pytest.mark.parametrize("reduced_vocab", [False, True])
def test_chunked_equals_unchunked_loss_stats_and_gradients(chunk_rows, reduced_vocab):
    vocab, vd = 50, (20 if reduced_vocab else None)
    x, s, w, w2, target_w, target_hidden, labels, coef = _problem(vocab=vocab, draft_vocab=vd)
    target_ids = (
        torch.sort(torch.randperm(vocab, generator=torch.Generator().manual_seed(1))[:vd]).values
        if vd
        else None
    )
    params = [x, s, w, w2]

    ref_loss, ref_stats, ref_tv = reference_vocab_loss(
        [(x, w), (s, w2)], target_hidden, target_w, coef, labels, target_ids
    )
    ref_grads = torch.autograd.grad(ref_loss, params)

    out = vocab_loss(
        [(x, w), (s, w2)],
        target_hidden,
        lambda hid: F.linear(hid, target_w),
        coef,
        labels=labels,
        target_ids=target_ids,
        chunk_rows=chunk_rows,
    )
    grads = torch.autograd.grad(out.loss, params)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ("ce", "soft_ce", "l1"):
        torch.testing.assert_close(getattr(out, name), ref_stats[name].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.tv, ref_tv, rtol=1e-5, atol=1e-6)
    for got, want, name in zip(grads, ref_grads, ["x", "states", "W", "W2"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    assert not out.tv.requires_grad and not out.ce.requires_grad


def test_frozen_inputs_get_no_gradient_and_grad_output_scales():
    x, _s, _w, _w2, target_w, target_hidden, labels, coef = _problem()
    frozen_w = target_w.clone()  # a frozen (target) LM head as the draft head: DFlash
    out = vocab_loss(
        [(x, frozen_w)], target_hidden, lambda h: F.linear(h, target_w), VocabLossTerms(ce=coef.ce), labels
    )
    (3.0 * out.loss).backward()
    ref, _, _ = reference_vocab_loss(
        [(x, frozen_w)], target_hidden, target_w, VocabLossTerms(ce=coef.ce), labels
    )
    (ref_grad,) = torch.autograd.grad(3.0 * ref, [x])
    assert frozen_w.grad is None
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError):  # buffers were handed over: a second backward is refused
        out.loss.backward()


def test_no_rows_gives_a_differentiable_zero():
    x = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    out = vocab_loss(
        [(x, w)],
        torch.zeros(0, 8),
        lambda h: F.linear(h, torch.randn(10, 8)),
        VocabLossTerms(soft_ce=torch.zeros(0)),
    )
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert torch.all(w.grad == 0) and out.tv.shape == (0,)


def test_no_grad_mode_skips_gradients():
    x, _s, w, _w2, target_w, target_hidden, labels, coef = _problem()
    with torch.no_grad():
        out = vocab_loss([(x, w)], target_hidden, lambda h: F.linear(h, target_w), coef, labels)
    assert not out.loss.requires_grad and torch.isfinite(out.loss)


def test_autocast_runs_matmuls_in_the_autocast_dtype():
    """Under bf16 autocast the loss matches the plain formulation under the same autocast (bf16 tolerance)."""
    x, s, w, w2, target_w, target_hidden, labels, coef = _problem(n=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _, _ = reference_vocab_loss([(x, w), (s, w2)], target_hidden, target_w, coef, labels)
        out = vocab_loss(
            [(x, w), (s, w2)],
            target_hidden,
            lambda h: F.linear(h, target_w).float(),
            coef,
            labels,
            chunk_rows=7,
        )
    torch.testing.assert_close(out.loss, ref, rtol=2e-2, atol=1e-2)
    gx, gw = torch.autograd.grad(out.loss, [x, w])
    rx, rw = torch.autograd.grad(ref, [x, w])
    assert gx.dtype == x.dtype and gw.dtype == w.dtype
    for got, want in ((gx, rx), (gw, rw)):  # bf16 rounding (and L1's sign flips): compare as whole tensors
        assert (got - want).norm() <= 3e-2 * want.norm()


def test_bad_arguments_are_named():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="at least one loss term"):
        vocab_loss([(x, torch.randn(5, 4))], x, lambda h: h, VocabLossTerms())
    with pytest.raises(ValueError, match="needs labels"):
        vocab_loss([(x, torch.randn(5, 4))], x, lambda h: h, VocabLossTerms(ce=torch.ones(3)))
    with pytest.raises(ValueError, match="do not chain"):
        vocab_loss([(x, torch.randn(5, 3))], x, lambda h: h, VocabLossTerms(l1=torch.ones(3)))


# --------------------------------------------------------------------------------------------------
# Each draft's loss == its original unchunked formulation (loss, metrics, acceptance, every gradient)
# --------------------------------------------------------------------------------------------------


def eagle3_reference(draft, batch):
    """The unchunked Eagle3 loss: target distributions once, then per unroll step a soft CE on all rows."""
    from deepspec.models.eagle3 import _shift_left

    steps, decay = draft.cfg.ttt_steps, draft.cfg.ttt_decay
    b, t = batch.input_ids.shape
    sup = batch.supervised()
    pred_pos = _shift_left(sup.long(), 1).bool()
    rows = pred_pos.nonzero(as_tuple=True)
    row_of = torch.full((b, t), -1, dtype=torch.long)
    row_of[rows] = torch.arange(rows[0].numel())
    with torch.no_grad():
        t_logits = draft.target_logits(batch.target_last_hidden[rows])
        p_full = torch.softmax(t_logits, dim=-1)
        p_dv = torch.softmax(t_logits[:, draft.draft_ids], dim=-1)
        in_mass = p_full[:, draft.draft_ids].sum(-1)
    total = torch.zeros(())
    accs, valids = [], []
    for k, out in enumerate(draft.unroll(batch.input_ids, batch.features, steps)):
        valid = _shift_left(sup.long(), 2 + k).bool()
        idx = valid.nonzero(as_tuple=True)
        r = row_of[idx[0], idx[1] + 1 + k]
        logp = torch.log_softmax(draft.logits(out[idx]).float(), dim=-1)
        ce = -(p_dv[r] * logp).sum(-1)
        total = total + decay**k * masked_mean(ce, torch.ones_like(ce))
        with torch.no_grad():
            tv = 0.5 * ((logp.exp() - p_full[r][:, draft.draft_ids]).abs().sum(-1) + (1.0 - in_mass[r]))
            acc = torch.zeros(b, t)
            acc[idx] = 1.0 - tv
        accs.append(acc)
        valids.append(valid)
    return total, position_acceptance(torch.stack(accs, -1), torch.stack(valids, -1))


def dflash_reference(draft, batch, anchors):
    out = draft.block_forward(batch, anchors, torch.ones_like(anchors, dtype=torch.bool))
    sel = out.valid.nonzero(as_tuple=True)
    logits = draft.target_lm_head(out.hidden[sel]).float()
    ce = F.cross_entropy(logits, out.labels[sel], reduction="none")
    loss = masked_mean(ce, draft.slot_weights(out.valid)[sel])
    with torch.no_grad():
        p_t = torch.softmax(draft.target_logits(draft.target_rows(batch, out, sel)), -1)
        acc = torch.zeros(out.valid.shape)
        acc[sel] = 1.0 - 0.5 * (torch.softmax(logits, -1) - p_t).abs().sum(-1)
    return loss, position_acceptance(acc, out.valid)


def dspark_reference(draft, batch, anchors):
    out = draft.block_forward(batch, anchors, torch.ones_like(anchors, dtype=torch.bool))
    sel = out.valid.nonzero(as_tuple=True)
    h, prev = out.hidden[sel], out.prev_tokens[sel]
    states = draft.markov_head.states(out.prev_tokens)[sel]
    logits = draft.target_lm_head(h).float() + draft.markov_head.bias(states).float()
    logp = torch.log_softmax(logits, dim=-1)
    p_t = torch.softmax(draft.target_logits(draft.target_rows(batch, out, sel)), -1)
    w = draft.slot_weights(out.valid)[sel]
    l1 = (logp.exp() - p_t).abs().sum(-1)
    acc = (1.0 - 0.5 * l1).detach().clamp(0.0, 1.0)
    bce = F.binary_cross_entropy_with_logits(draft.confidence_logit(h, prev).float(), acc)
    loss = 0.1 * masked_mean(F.nll_loss(logp, out.labels[sel], reduction="none"), w) + 0.9 * masked_mean(
        l1, w
    )
    acc_grid = torch.zeros(out.valid.shape)
    acc_grid[sel] = acc
    return loss + bce, position_acceptance(acc_grid, out.valid)


def _grads(draft, loss):
    names = [n for n, p in draft.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [dict(draft.named_parameters())[n] for n in names])
    return dict(zip(names, grads, strict=True))


@pytest.mark.parametrize("algorithm", ["eagle3", "eagle3-reduced", "dflash", "dspark"])
@pytest.mark.parametrize("chunk_rows", [3, None])  # 3 rows per chunk; everything in one chunk
def test_draft_loss_equals_its_unchunked_formulation(llama_target, algorithm, chunk_rows):
    target = llama_target
    batch = make_batch(target)
    anchors = torch.tensor([[6, 9, 12], [7, 10, 11]])
    if algorithm.startswith("eagle3"):
        draft = make_draft(
            "eagle3", target, ttt_steps=3, **({"draft_vocab_size": 40} if "reduced" in algorithm else {})
        )
        if "reduced" in algorithm:
            draft.set_vocab_mapping(*build_vocab_mapping(batch_token_counts(batch, target.vocab_size), 40))
        ref_loss, ref_acc = eagle3_reference(draft, batch)
    else:
        draft = make_draft(algorithm, target)
        if algorithm == "dspark":
            with torch.no_grad():  # a non-trivial Markov head (W2 starts at zero)
                torch.nn.init.normal_(draft.markov_head.markov_w2.weight, std=0.3)
        ref = dflash_reference if algorithm == "dflash" else dspark_reference
        ref_loss, ref_acc = ref(draft, batch, anchors)
    ref_grads = _grads(draft, ref_loss)
    draft.loss_chunk_bytes = 2**40 if chunk_rows is None else chunk_rows * 4 * target.vocab_size
    out = draft(batch) if algorithm.startswith("eagle3") else draft(batch, anchors=anchors)
    grads = _grads(draft, out.loss)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.position_acceptance, ref_acc, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


# --------------------------------------------------------------------------------------------------
# Memory: the [rows, V] tensors no longer accumulate
# --------------------------------------------------------------------------------------------------


def _peak_bytes(fn) -> int:
    """Peak CPU-allocator bytes above the level when ``fn`` starts (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:  # the running totals live in the trace's [memory] events
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0, *totals])


def test_peak_memory_is_bounded_by_the_chunk_not_by_rows_times_vocab():
    n, h, vocab = 1024, 32, 4096  # one [n, V] fp32 tensor = 16 MiB
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=g, requires_grad=True)
    w = torch.randn(vocab, h, generator=g, requires_grad=True)
    target_w = torch.randn(vocab, h, generator=g)
    target_hidden = torch.randn(n, h, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    coef = VocabLossTerms(ce=torch.full((n,), 1.0 / n), l1=torch.full((n,), 1.0 / n))
    row_bytes = n * vocab * 4

    def chunked():
        out = vocab_loss(
            [(x, w)], target_hidden, lambda t: F.linear(t, target_w), coef, labels, chunk_rows=64
        )
        out.loss.backward()

    def unchunked():
        ref, _, _ = reference_vocab_loss([(x, w)], target_hidden, target_w, coef, labels)
        ref.backward()

    chunked_peak, unchunked_peak = _peak_bytes(chunked), _peak_bytes(unchunked)
    # the unchunked graph holds several [n, V] tensors; the chunked one a few [64, V] ones plus grad buffers
    assert unchunked_peak > 4 * row_bytes
    assert chunked_peak < row_bytes, (chunked_peak / 2**20, unchunked_peak / 2**20)
