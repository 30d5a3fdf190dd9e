"""Per-request sampling and stopping inside one padded ``model.generate`` batch.

transformers' ``generate`` applies one sampling configuration to the whole batch, and its continuous
batching supports per-request temperature / top-k / top-p only (no min-p, no per-request seed, no
per-request stop strings). These two plug-ins give every row of a batch its own parameters while
``generate`` keeps running the decoding loop:

* :class:`PerRowSampler` is a logits processor. For each sampling row (temperature > 0) it applies
  that row's temperature, top-k, top-p and min-p, draws the next token with the row's own
  ``torch.Generator`` (seeded from the request's ``seed``) and returns scores that are ``-inf``
  everywhere except the drawn token. ``generate`` runs in greedy mode, so its argmax picks exactly
  that token. Greedy rows (temperature 0) are left untouched, hence identical to ``generate`` greedy.
  Because each row draws from its own generator, a seeded request gives the same answer whatever
  else shares its batch.
* :class:`PerRowStopping` is a stopping criterion: a row is done when it reached its own
  ``max_tokens`` or produced one of its own stop strings (the step is recorded so the answer can be
  cut there). End-of-sequence tokens are handled by ``generate`` itself.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, StoppingCriteria


@dataclass
class SamplingParams:
    """The sampling parameters of one request (already validated)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class PerRowSampler(LogitsProcessor):
    """Sample each row with its own parameters and generator; emit a one-hot score row."""

    def __init__(self, params: list[SamplingParams], device: torch.device | str) -> None:
        self.device = torch.device(device)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        self.rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        sel = [params[i] for i in rows]
        self.temperature = torch.tensor([p.temperature for p in sel], dtype=torch.float32, device=self.device)
        self.top_k = torch.tensor([p.top_k for p in sel], dtype=torch.long, device=self.device)
        self.top_p = torch.tensor([p.top_p for p in sel], dtype=torch.float32, device=self.device)
        self.min_p = torch.tensor([p.min_p for p in sel], dtype=torch.float32, device=self.device)
        self.any_top_k = any(p.top_k > 0 for p in sel)
        self.any_top_p = any(p.top_p < 1.0 for p in sel)
        self.any_min_p = any(p.min_p > 0.0 for p in sel)
        # One CPU generator per sampling row: the draw of a row never depends on the other rows.
        self.generators = [
            torch.Generator().manual_seed(p.seed if p.seed is not None else secrets.randbits(63)) for p in sel
        ]

    def _uniforms(self) -> torch.Tensor:
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        return u.to(device=self.device, dtype=torch.float32).unsqueeze(1)  # [R, 1]

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.rows.numel() == 0:
            return scores
        logits = scores[self.rows].float() / self.temperature[:, None]  # [R, V]
        neg_inf = torch.tensor(float("-inf"), device=logits.device)
        # Filters work in vocabulary order; only top-p needs a full sort, so it is done only when asked
        # for (a 50k-entry sort costs tens of ms per step on a busy CPU).
        if self.any_top_k:  # keep tokens at least as likely as the row's k-th best
            k = self.top_k.clamp(min=1, max=logits.shape[-1])
            best = logits.topk(int(k.max()), dim=-1).values  # [R, kmax]
            kth = best.gather(1, (k - 1)[:, None])
            kth = torch.where(self.top_k[:, None] > 0, kth, neg_inf)
            logits = torch.where(logits < kth, neg_inf, logits)
        if self.any_top_p:  # keep the smallest set of best tokens whose mass reaches p
            probs = logits.softmax(dim=-1)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop_sorted = before >= self.top_p[:, None]
            drop_sorted[:, 0] = False  # the best token always stays
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            logits = torch.where(drop, neg_inf, logits)
        if self.any_min_p:  # drop tokens below min_p * p(best)
            probs = logits.softmax(dim=-1)
            floor = self.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            logits = torch.where(probs < floor, neg_inf, logits)
        # inverse-CDF draw with the row's own uniform
        cdf = logits.softmax(dim=-1).cumsum(dim=-1)
        token = torch.searchsorted(cdf, self._uniforms() * cdf[:, -1:]).clamp_(max=logits.shape[-1] - 1)
        out = scores.index_fill(0, self.rows, float("-inf"))
        out[self.rows, token.squeeze(1)] = 0.0
        return out


class PerRowStopping(StoppingCriteria):
    """Stop each row at its own ``max_tokens`` or at the first of its own stop strings."""

    def __init__(self, params: list[SamplingParams], prompt_len: int, tokenizer) -> None:
        self.params = params
        self.prompt_len = prompt_len
        self.tokenizer = tokenizer
        self.max_tokens = torch.tensor([p.max_tokens for p in params], dtype=torch.long)
        # A stop string of L characters spans at most L tokens (+ a margin for byte-level pieces).
        self.window = [max((len(s) for s in p.stop), default=0) + 4 for p in params]
        self.stopped_at: dict[int, int] = {}  # row -> generated length when its stop string appeared

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_len
        done = generated >= self.max_tokens
        for i, p in enumerate(self.params):
            if not p.stop or i in self.stopped_at or done[i]:
                if i in self.stopped_at:
                    done[i] = True
                continue
            start = max(self.prompt_len, input_ids.shape[1] - self.window[i])
            tail = self.tokenizer.decode(input_ids[i, start:].tolist(), skip_special_tokens=True)
            if any(s in tail for s in p.stop):
                self.stopped_at[i] = generated
                done[i] = True
        return done.to(input_ids.device)
