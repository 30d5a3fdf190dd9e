"""Exact verification of a draft proposal (speculative sampling) and target-only sampling.

Given target distributions ``p_0..p_g`` (``p_i`` = next-token distribution after the anchor and the
first ``i`` draft tokens) and the draft's ``q_1..q_g`` with sampled tokens ``d_1..d_g``:

* T > 0: accept ``d_i`` with probability ``min(1, p_{i-1}(d_i) / q_i(d_i))``; at the first rejection
  sample the corrected token from ``norm(max(0, p_{i-1} - q_i))`` and stop; when all are accepted
  sample the bonus token from ``p_g``. The committed tokens are then distributed exactly as the
  target's own samples (Leviathan et al. 2023, Chen et al. 2023).
* T == 0: accept ``d_i`` iff it equals ``argmax p_{i-1}``; the corrected / bonus token is the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Verification:
    accepted: int  # number of draft tokens accepted (0..g)
    next_token: int  # the corrected (on rejection) or bonus (all accepted) token


def target_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax at ``temperature`` in float32 (``temperature`` must be > 0)."""
    return torch.softmax(logits.float() / temperature, dim=-1)


def sample_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """One target token from a [V] logit row: argmax at T == 0, else a multinomial sample."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = target_probs(logits, temperature)
    return int(torch.multinomial(probs, 1, generator=generator))


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None = None,
) -> Verification:
    """Verify ``g`` draft tokens against ``g + 1`` target logit rows.

    draft_tokens: [g] long; draft_probs: [g, V] (ignored at T == 0); target_logits: [g + 1, V].
    """
    g = int(draft_tokens.numel())
    if target_logits.shape[0] != g + 1:
        raise ValueError(f"need {g + 1} target logit rows for {g} draft tokens, got {target_logits.shape[0]}")
    if temperature == 0:
        greedy = torch.argmax(target_logits, dim=-1)  # [g + 1]
        matches = (greedy[:g] == draft_tokens.to(greedy.device)).tolist()
        accepted = g
        for i, ok in enumerate(matches):
            if not ok:
                accepted = i
                break
        return Verification(accepted, int(greedy[accepted]))

    p = target_probs(target_logits, temperature)  # [g + 1, V]
    q = draft_probs.to(device=p.device, dtype=torch.float32)
    tokens = draft_tokens.to(p.device)
    if g:
        idx = torch.arange(g, device=p.device)
        p_d = p[idx, tokens]
        q_d = q[idx, tokens]
        # One uniform per slot drawn up front: the stream of random numbers does not depend on where
        # the chain stops, so results are reproducible for a given generator seed.
        u = torch.rand(g, generator=generator, device=p.device)
        ok = u * q_d <= p_d  # u < p/q without dividing by a zero q (q_d > 0 for a sampled token)
        for i in range(g):
            if not bool(ok[i]):
                residual = torch.clamp(p[i] - q[i], min=0.0)
                total = float(residual.sum())
                if total <= 0.0:  # p == q up to rounding: rejection then has probability ~0
                    residual = p[i]
                    total = 1.0
                token = int(torch.multinomial(residual / total, 1, generator=generator))
                return Verification(i, token)
    bonus = int(torch.multinomial(p[g], 1, generator=generator))
    return Verification(g, bonus)
