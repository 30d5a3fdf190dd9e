"""Batched verification and sampling on the device, one random stream per row.

Every random choice is an inverse-CDF draw with a uniform taken from the row's own generator, in a
fixed number per step (``gamma + 1`` per verification round, one per plain step), so

* there is no data-dependent host round trip inside a step (the rejection position, the residual
  distribution and the bonus token are all chosen with tensor operations);
* a row's tokens depend only on its own generator, never on which rows share its batch.

Verification follows Leviathan et al. 2023 / Chen et al. 2023 (see :mod:`deepspec.eval.sampling`
for the single-row reference): accept slot ``i`` when ``u_i * q_i(d_i) <= p_{i-1}(d_i)``; at the first
rejection draw from ``norm(max(0, p - q))`` at that slot, otherwise the bonus token from ``p_g``.
At temperature 0 a slot is accepted iff it equals the target's argmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def row_uniforms(
    generators: Sequence[torch.Generator | None], n: int, device: torch.device | str
) -> torch.Tensor:
    """``[B, n]`` float32 uniforms in [0, 1), row ``b`` drawn from ``generators[b]`` (None = global RNG)."""
    draws = []
    for gen in generators:
        where = gen.device if gen is not None else torch.device(device)
        draws.append(torch.rand(n, generator=gen, device=where).to(device))
    return torch.stack(draws) if draws else torch.zeros(0, n, device=device)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of unnormalised ``probs`` [B, V] from uniforms ``u`` [B]; never a zero-mass token."""
    cdf = probs.float().cumsum(dim=-1)
    x = u.float()[:, None] * cdf[:, -1:]
    # first index whose cumulative mass exceeds x: its own mass is > 0
    token = torch.searchsorted(cdf, x, right=True).clamp_(max=probs.shape[-1] - 1)
    return token.squeeze(1)


def sample_rows(logits: torch.Tensor, temperature: float, u: torch.Tensor | None) -> torch.Tensor:
    """Target samples from logit rows [B, V]: argmax at T == 0, else inverse-CDF of softmax(logits / T)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if u is None:
        raise ValueError("sampling at temperature > 0 needs one uniform per row")
    return inverse_cdf(torch.softmax(logits.float() / temperature, dim=-1), u)


def verify_rows(
    draft: torch.Tensor,
    draft_len: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    temperature: float,
    u: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify padded drafts of every row at once.

    draft: [B, G] tokens (slots past ``draft_len[b]`` are padding); draft_probs: [B, G, V] the draft
    distributions (unused at T == 0); target_logits: [B, G + 1, V]; u: [B, G + 1] uniforms (slots
    ``0..G-1`` for acceptance, slot ``G`` for the corrected / bonus token).
    Returns (accepted [B] in ``0..draft_len``, next token [B]).
    """
    b, g = draft.shape
    if target_logits.shape[1] != g + 1:
        raise ValueError(f"need {g + 1} target positions for {g} draft slots, got {target_logits.shape[1]}")
    rows = torch.arange(b, device=target_logits.device)
    valid = torch.arange(g, device=draft.device)[None, :] < draft_len[:, None]
    if temperature == 0:
        greedy = target_logits.argmax(dim=-1)  # [B, G + 1]
        ok = (greedy[:, :g] == draft) & valid
        accepted = ok.long().cumprod(dim=1).sum(dim=1)
        return accepted, greedy[rows, accepted]
    if u is None or (draft_probs is None and g):
        raise ValueError("verification at temperature > 0 needs draft probabilities and uniforms")
    p = torch.softmax(target_logits.float() / temperature, dim=-1)  # [B, G + 1, V]
    if g:
        q = draft_probs.float()
        p_d = p[:, :g].gather(2, draft[:, :, None]).squeeze(2)
        q_d = q.gather(2, draft[:, :, None]).squeeze(2)
        ok = (u[:, :g] * q_d <= p_d) & valid  # u < p/q without dividing by q
        accepted = ok.long().cumprod(dim=1).sum(dim=1)
    else:
        accepted = torch.zeros(b, dtype=torch.long, device=p.device)
    final = p[rows, accepted]  # [B, V]: the target distribution at the stopping slot
    if g:
        rejected = accepted < draft_len
        q_at = q[rows, accepted.clamp(max=g - 1)]
        residual = torch.clamp(final - q_at, min=0.0)
        # p == q up to rounding leaves no residual mass; rejection then had probability ~0: use p
        usable = rejected & (residual.sum(dim=-1) > 0)
        final = torch.where(usable[:, None], residual, final)
    return accepted, inverse_cdf(final, u[:, g])


def filtered_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    active: tuple[bool, bool, bool] = (True, True, True),
) -> torch.Tensor:
    """Per-row temperature, top-k (0 = off), top-p (1 = off) and min-p (0 = off) over [B, V] logits.

    ``active`` says (host-side, so no device sync is needed) whether any row uses top-k, top-p,
    min-p; filters nobody asked for are skipped (the full sort of top-p is the costly one). Rows
    with temperature 0 must be handled by the caller (argmax).
    """
    logits = logits.float() / temperature.clamp(min=1e-6)[:, None]
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    if active[0]:  # keep tokens at least as likely as the row's k-th best
        k = top_k.clamp(min=1, max=logits.shape[-1])
        best = logits.topk(int(k.max()), dim=-1).values
        kth = best.gather(1, (k - 1)[:, None])
        kth = torch.where(top_k[:, None] > 0, kth, neg_inf)
        logits = torch.where(logits < kth, neg_inf, logits)
    if active[1]:  # keep the smallest set of best tokens whose mass reaches p
        probs = logits.softmax(dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = before >= top_p[:, None]
        drop_sorted[:, 0] = False  # the best token always stays
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = torch.where(drop, neg_inf, logits)
    probs = logits.softmax(dim=-1)
    if active[2]:  # drop tokens below min_p * p(best)
        floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = torch.where(probs < floor, 0.0, probs)
    return probs
