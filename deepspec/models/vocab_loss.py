"""The chunked LM head + full-vocabulary loss shared by the drafts, and small loss helpers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# --------------------------------------------------------------------------------------------------
# Shared loss helpers
# --------------------------------------------------------------------------------------------------


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """0.5 * sum |p - q| over the last dim."""
    return 0.5 * (p - q).abs().sum(-1)


def masked_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(x * w) / max(sum(w), eps) (0 when nothing is supervised, still differentiable)."""
    w = weight.to(x.dtype)
    return (x * w).sum() / w.sum().clamp_min(1e-6)


def position_acceptance(acc: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """acc, valid: [..., g] -> [g] mean acceptance per position over valid entries (0 where none)."""
    g = acc.shape[-1]
    a = acc.detach().float().reshape(-1, g)
    v = valid.reshape(-1, g).float()
    return (a * v).sum(0) / v.sum(0).clamp_min(1.0)


# --------------------------------------------------------------------------------------------------
# Chunked LM head + full-vocabulary loss
# --------------------------------------------------------------------------------------------------
#
# The large tensors of draft training are [rows, V] (V = 151,936 for Qwen3): draft logits, target logits and
# both softmaxes for every supervised (anchor, slot) or (position, unroll step). Autograd would keep several of
# them per row for backward. ``vocab_loss`` instead walks the rows in chunks and, for each chunk, computes the
# draft logits, the target distribution (frozen LM head on the target's final hidden state, no grad), the loss
# terms, their per-row statistics and, right away, the gradient of the weighted loss with respect to the head
# inputs and trainable head weights (the loss is a weighted sum over rows with weights known up front, so
# d loss / d logits is known in the forward pass). Only those gradients ([rows, d] and [V, d]) outlive the
# chunk; backward just scales them by the incoming scalar gradient. No [rows, V] tensor is saved or recomputed.


@dataclass
class VocabLossTerms:
    """Per-row coefficients [n] of the loss terms (None: term unused). loss = sum_rows sum_terms coef * term.

    ce:      cross-entropy of the draft distribution against ``labels``;
    soft_ce: -sum_v p_target(v) log p_draft(v) (Eagle3);
    l1:      sum_v |p_draft(v) - p_target(v)| (DSpark).
    """

    ce: torch.Tensor | None = None
    soft_ce: torch.Tensor | None = None
    l1: torch.Tensor | None = None

    def names(self) -> list[str]:
        return [k for k in ("ce", "soft_ce", "l1") if getattr(self, k) is not None]


@dataclass
class VocabLossOutput:
    loss: torch.Tensor  # scalar, differentiable: sum over rows and terms of coef * term
    ce: torch.Tensor | None  # [n] per-row values (detached), for the terms that were asked for
    soft_ce: torch.Tensor | None
    l1: torch.Tensor | None
    tv: torch.Tensor  # [n] TV(p_draft, p_target) over the full target vocabulary (detached): 1 - acceptance


@dataclass
class _VocabLossPlan:
    """The non-tensor arguments of :class:`_VocabLossFunction`."""

    num_heads: int
    target_logits: Callable[[torch.Tensor], torch.Tensor]
    terms: list[str]
    has_labels: bool
    has_target_ids: bool
    bias: torch.Tensor | None  # [Vd] frozen logit bias (fp32), or None
    chunk_rows: int
    compute_dtypes: list[torch.dtype]
    need_grad: list[bool]  # per differentiable input (xs then ws)


def _chunk_stats(
    z: torch.Tensor,
    t: torch.Tensor,
    plan: _VocabLossPlan,
    labels: torch.Tensor | None,
    target_ids: torch.Tensor | None,
    coef: dict[str, torch.Tensor],
    want_grad: bool,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """One chunk: draft logits z [c, Vd] and target logits t [c, V] (both fp32, both consumed in place).

    Returns the per-row statistics {term: [c], "tv": [c]} and d(sum_rows coef * term)/dz [c, Vd] (or None).
    """
    rows = torch.arange(z.shape[0], device=z.device)
    # target distribution p_t over the draft vocabulary (renormalised on it when the vocabulary is reduced)
    if target_ids is not None:
        lse_full = torch.logsumexp(t, dim=-1, keepdim=True)
        t = t[:, target_ids]  # [c, Vd]
        lse_t = torch.logsumexp(t, dim=-1, keepdim=True)
        in_mass = torch.exp(lse_t - lse_full)  # [c, 1] target mass inside the draft vocabulary
    else:
        lse_t = torch.logsumexp(t, dim=-1, keepdim=True)
        in_mass = None
    p_t = t.sub_(lse_t).exp_()
    logp = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))  # log p_draft
    out: dict[str, torch.Tensor] = {}
    if "soft_ce" in plan.terms:
        out["soft_ce"] = -(p_t * logp).sum(-1)
    if "ce" in plan.terms:
        assert labels is not None
        out["ce"] = -logp[rows, labels]
    p_d = logp.exp_()
    diff = p_d - p_t
    if in_mass is None:
        l1 = torch.linalg.vector_norm(diff, ord=1, dim=-1)
        out["tv"] = 0.5 * l1
    else:
        l1 = torch.linalg.vector_norm(diff, ord=1, dim=-1) if "l1" in plan.terms else None
        tv_in = torch.linalg.vector_norm(p_d - p_t * in_mass, ord=1, dim=-1)
        out["tv"] = 0.5 * (tv_in + (1.0 - in_mass[:, 0]))
    if "l1" in plan.terms:
        out["l1"] = l1  # type: ignore[assignment]
    if not want_grad:
        return out, None
    # d/dz of   a*CE + b*softCE + c*L1   (per row a, b, c):
    #   CE:     p_d - onehot(label);   softCE: sum(p_t) p_d - p_t;   L1: p_d * (s - <p_d, s>), s = sign(p_d - p_t)
    scale = torch.zeros(z.shape[0], 1, device=z.device, dtype=z.dtype)
    if "ce" in plan.terms:
        scale += coef["ce"][:, None]
    if "soft_ce" in plan.terms:
        scale += coef["soft_ce"][:, None] * p_t.sum(-1, keepdim=True)
    s = None
    if "l1" in plan.terms:
        s = diff.sign_()
        scale -= coef["l1"][:, None] * (p_d * s).sum(-1, keepdim=True)
    grad = p_d.mul(scale)
    if s is not None:
        grad.addcmul_(p_d, s.mul_(coef["l1"][:, None]))
    if "soft_ce" in plan.terms:
        grad.addcmul_(p_t, coef["soft_ce"][:, None], value=-1.0)
    if "ce" in plan.terms:
        grad[rows, labels] -= coef["ce"]
    return out, grad


class _VocabLossFunction(torch.autograd.Function):
    """See :func:`vocab_loss`. Inputs after ``plan``: xs..., ws..., target_hidden, labels, target_ids, coefs..."""

    @staticmethod
    def forward(ctx: Any, plan: _VocabLossPlan, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        k = plan.num_heads
        xs, ws = tensors[:k], tensors[k : 2 * k]
        target_hidden, labels, target_ids = tensors[2 * k : 2 * k + 3]
        coef = dict(zip(plan.terms, tensors[2 * k + 3 :], strict=True))
        n = xs[0].shape[0]
        dev = xs[0].device
        need_x, need_w = plan.need_grad[:k], plan.need_grad[k:]
        want_grad = any(plan.need_grad)
        stat_names = [*plan.terms, "tv"]
        stats = torch.zeros(len(stat_names), n, device=dev, dtype=torch.float32)
        loss = torch.zeros((), device=dev, dtype=torch.float32)
        grad_x = [
            torch.zeros(x.shape, device=dev, dtype=torch.float32) if g else None
            for x, g in zip(xs, need_x, strict=True)
        ]
        grad_w = [
            torch.zeros(w.shape, device=dev, dtype=torch.float32) if g else None
            for w, g in zip(ws, need_w, strict=True)
        ]
        with torch.autocast(dev.type, enabled=False):
            wc = [
                w.detach().to(cd) for w, cd in zip(ws, plan.compute_dtypes, strict=True)
            ]  # cast once, not per chunk
            for start in range(0, n, plan.chunk_rows):
                sl = slice(start, min(n, start + plan.chunk_rows))
                xc = [x[sl].detach().to(cd) for x, cd in zip(xs, plan.compute_dtypes, strict=True)]
                z = torch.mm(xc[0], wc[0].t()).float()  # [c, Vd] draft logits
                for x_i, w_i in zip(xc[1:], wc[1:], strict=True):
                    z.add_(torch.mm(x_i, w_i.t()))
                if plan.bias is not None:
                    z.add_(plan.bias)
                t = plan.target_logits(target_hidden[sl]).float()  # [c, V]
                chunk_coef = {name: c[sl].float() for name, c in coef.items()}
                out, grad = _chunk_stats(
                    z, t, plan,
                    labels[sl] if plan.has_labels else None,
                    target_ids if plan.has_target_ids else None,
                    chunk_coef, want_grad,
                )  # fmt: skip
                del z, t
                for i, name in enumerate(stat_names):
                    stats[i, sl] = out[name]
                for name in plan.terms:
                    loss += (chunk_coef[name] * out[name]).sum()
                if grad is None:
                    continue
                for i in range(k):
                    g = grad.to(plan.compute_dtypes[i])
                    if grad_x[i] is not None:
                        grad_x[i][sl] = torch.mm(g, wc[i])  # type: ignore[index]
                    if grad_w[i] is not None:
                        grad_w[i].add_(torch.mm(g.t(), xc[i]))  # type: ignore[union-attr]
                    del g
                del grad
        ctx.grads = [*grad_x, *grad_w]
        ctx.dtypes = [t.dtype for t in (*xs, *ws)]
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_stats: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("vocab_loss: backward through the chunked LM-head loss can run only once")
        grads, ctx.grads = ctx.grads, None  # hand the buffers over (AccumulateGrad may keep them as .grad)
        out = [
            None if g is None else g.mul_(grad_loss).to(dt) for g, dt in zip(grads, ctx.dtypes, strict=True)
        ]
        return (None, *out, *([None] * (len(ctx.needs_input_grad) - 1 - len(out))))


def vocab_loss(
    heads: Sequence[tuple[torch.Tensor, torch.Tensor]],
    target_hidden: torch.Tensor,
    target_logits: Callable[[torch.Tensor], torch.Tensor],
    coef: VocabLossTerms,
    labels: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    chunk_rows: int = 1024,
) -> VocabLossOutput:
    """Full-vocabulary draft loss, processed ``chunk_rows`` rows at a time (memory O(chunk_rows * V)).

    heads:         pairs (x_i [n, d_i], W_i [Vd, d_i]); draft logits = sum_i x_i W_i^T, in fp32. Gradients flow to
                   every x_i / W_i that requires grad (Eagle3's own LM head, DSpark's Markov W2); frozen target
                   weights stay without gradient.
    target_hidden: [n, H] the target's final normed hidden state of each row's target distribution;
    target_logits: maps target_hidden rows to target logits [c, V] (frozen LM head, no grad);
    coef:          per-row coefficients of the loss terms (e.g. slot weight / sum of weights);
    labels:        [n] token ids for the CE term;
    target_ids:    [Vd] target id of each draft id (Eagle3 reduced vocabulary): the loss target is the target
                   distribution renormalised on the draft vocabulary, TV counts the mass outside it; None when
                   the draft vocabulary is the target's;
    bias:          [Vd] frozen bias added to the draft logits (a target LM head with a bias), no gradient.

    Matmuls run in the autocast dtype when autocast is on (else each weight's dtype), softmaxes and losses in
    fp32, exactly as the unchunked ``F.linear(...).float()`` formulation does.
    """
    terms = coef.names()
    if not terms:
        raise ValueError("vocab_loss needs at least one loss term (ce, soft_ce or l1)")
    if "ce" in terms and labels is None:
        raise ValueError("vocab_loss: the ce term needs labels")
    if not heads:
        raise ValueError("vocab_loss needs at least one (x, W) head")
    n = heads[0][0].shape[0]
    for x, w in heads:
        if x.dim() != 2 or w.dim() != 2 or x.shape[0] != n or x.shape[1] != w.shape[1]:
            raise ValueError(f"vocab_loss: head shapes {tuple(x.shape)} x {tuple(w.shape)}^T do not chain")
    dev = heads[0][0].device
    autocast = torch.is_autocast_enabled(dev.type)
    autocast_dtype = torch.get_autocast_dtype(dev.type) if autocast else None
    xs = [x for x, _ in heads]
    ws = [w for _, w in heads]
    grad_on = torch.is_grad_enabled()
    plan = _VocabLossPlan(
        num_heads=len(heads),
        target_logits=target_logits,
        terms=terms,
        has_labels=labels is not None,
        has_target_ids=target_ids is not None,
        bias=None if bias is None else bias.detach().float(),
        chunk_rows=max(1, int(chunk_rows)),
        compute_dtypes=[autocast_dtype or w.dtype for w in ws],
        need_grad=[grad_on and t.requires_grad for t in (*xs, *ws)],
    )
    empty = torch.zeros(0, device=dev)
    coefs = [getattr(coef, name).detach() for name in terms]
    loss, stats = _VocabLossFunction.apply(
        plan,
        *xs,
        *ws,
        target_hidden.detach(),
        labels if labels is not None else empty,
        target_ids if target_ids is not None else empty,
        *coefs,
    )
    named = dict(zip([*terms, "tv"], stats.unbind(0), strict=True))
    return VocabLossOutput(
        loss=loss, ce=named.get("ce"), soft_ce=named.get("soft_ce"), l1=named.get("l1"), tv=named["tv"]
    )
