"""DSpark: the DFlash block backbone plus a sequential head and a confidence head (semi-autoregressive).

On top of the backbone's per-slot logits (slot k predicts token a+k+1, the anchor slot included: the DSpark
convention of SGLang ``models/dspark.py`` and vLLM ``qwen3_dspark.py``, unlike DFlash's, see
:mod:`deepspec.models.dflash`):

* **Markov head** (``markov_head="vanilla"``): slot k's logits get the bias ``B(x_{k-1}, .) = W2 W1[x_{k-1}]``
  where x_{k-1} is the token just before the predicted one (token a+k: the anchor for slot 0). W1 is a
  V x r embedding, W2 a Linear(r -> V) without bias, r = ``markov_rank`` (256). W2 starts at zero, so an
  untrained head leaves the backbone unchanged.
* **RNN head** (``markov_head="rnn"``): a gated recurrent state over the block,
  ``s_k = GRUCell(W1[x_{k-1}], s_{k-1})`` with ``s_{-1} = 0``, and the bias ``W2 s_k``.
* **Confidence head**: ``c_k = sigmoid(w^T [h_k ; W1[x_{k-1}]] + b)`` predicts the probability that slot k
  is accepted, supervised by ``1 - TV(p_draft_k, p_target_k)`` (target detached).

Parameter names are the engines' (``markov_head.markov_w1`` [V, r], ``markov_head.markov_w2`` [V, r],
``confidence_head.proj``), so the export is a rename-free copy. Only the ``vanilla`` head is served by both
engines; the ``rnn`` head here is a GRU, not SGLang's ``joint_proj`` design (export refuses it).

The previous tokens are the ground truth during training and the draft's own samples, left to right, at
inference. Loss = w_ce * CE + w_l1 * L1(p_draft - p_target) + w_bce * BCE(confidence), weights from
``draft.loss_weights`` (default 0.1 / 0.9 / 1.0); CE and L1 carry the DFlash slot weights exp(-k/decay)
on the supervised prefix, BCE is a plain mean over the same slots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from deepspec.models.base import Proposal, sample_from_logits
from deepspec.models.dflash import DFlashDraft, DFlashDrafter
from deepspec.models.draft import DraftBatch, DraftOutput
from deepspec.models.vocab_loss import VocabLossTerms, masked_mean, position_acceptance

if TYPE_CHECKING:
    from deepspec.config import DraftModelConfig
    from deepspec.target_model.model import TargetModel

LOSS_TERMS = ("ce", "l1", "bce")


class MarkovHead(nn.Module):
    """Low-rank bigram bias W2 W1[x] (``vanilla``), its gated recurrent variant (``rnn``), or W1 only (``none``)."""

    def __init__(self, vocab_size: int, rank: int, kind: str):
        super().__init__()
        if kind not in ("vanilla", "rnn", "none"):
            raise ValueError(f"draft.markov_head must be vanilla, rnn or none, got {kind!r}")
        self.kind = kind
        self.rank = rank
        self.markov_w1 = nn.Embedding(vocab_size, rank)  # W1: V x r
        nn.init.normal_(self.markov_w1.weight, std=0.02)
        if kind != "none":
            self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)  # W2: r -> V
            nn.init.zeros_(self.markov_w2.weight)
        if kind == "rnn":
            self.rnn = nn.GRUCell(rank, rank)

    def states(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        """prev_tokens [..., gamma] -> the vectors W2 multiplies [..., gamma, r] (left to right for rnn)."""
        e = self.markov_w1(prev_tokens)
        if self.kind != "rnn":
            return e
        lead = e.shape[:-2]
        flat = e.reshape(-1, e.shape[-2], self.rank)
        s = flat.new_zeros(flat.shape[0], self.rank)
        out = []
        for k in range(flat.shape[1]):
            s = self.rnn(flat[:, k], s)
            out.append(s)
        return torch.stack(out, dim=1).reshape(*lead, e.shape[-2], self.rank)

    def bias(self, state: torch.Tensor) -> torch.Tensor:
        """[..., r] -> [..., V] (zero for kind 'none')."""
        if self.kind == "none":
            return state.new_zeros(*state.shape[:-1], self.markov_w1.num_embeddings)
        return self.markov_w2(state)


class ConfidenceHead(nn.Module):
    """``proj``: Linear([h ; W1[x_prev]] -> 1) with bias, the engines' ``confidence_head.proj``."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size + rank, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.proj(feats).squeeze(-1)


class DSparkDraft(DFlashDraft):
    algorithm = "dspark"
    anchor_predicts = True

    def __init__(self, cfg: DraftModelConfig, target: TargetModel, mask_token_id: int | None = None):
        super().__init__(cfg, target, mask_token_id=mask_token_id)
        unknown = set(cfg.loss_weights) - set(LOSS_TERMS)
        if unknown:
            raise ValueError(
                f"draft.loss_weights has unknown terms {sorted(unknown)}; use {list(LOSS_TERMS)}"
            )
        self.loss_weights = {k: float(cfg.loss_weights.get(k, 0.0)) for k in LOSS_TERMS}
        self.markov_head = MarkovHead(self.dims.vocab_size, cfg.markov_rank, cfg.markov_head)
        self.confidence_head = (
            ConfidenceHead(self.dims.hidden_size, cfg.markov_rank) if cfg.confidence_head else None
        )
        self.to(target.lm_head.weight.device)

    def confidence_logit(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """w^T [h_k ; W1[x_{k-1}]] + b, [...]."""
        assert self.confidence_head is not None
        feats = torch.cat([hidden.to(self.param_dtype), self.markov_head.markov_w1(prev_tokens)], dim=-1)
        return self.confidence_head(feats)

    def forward(
        self, batch: DraftBatch, anchors: torch.Tensor | None = None, anchor_valid: torch.Tensor | None = None
    ) -> DraftOutput:
        out = self.training_blocks(batch, anchors, anchor_valid)
        sel = out.valid.nonzero(as_tuple=True)
        h = out.hidden[sel]  # [n, H]
        prev = out.prev_tokens[sel]  # [n] ground-truth token before each prediction
        # draft logits = target_lm_head(h) + W2 state: both heads go through the chunked loss
        heads = [(h, self.target.lm_head.weight)]
        if self.markov_head.kind != "none":
            states = self.markov_head.states(out.prev_tokens)[sel]  # [n, r]
            heads.append((states, self.markov_head.markov_w2.weight))
        w = self.slot_weights(out.valid)[sel]
        wn = w / w.sum().clamp_min(1e-6)  # masked_mean(., w) as per-row coefficients
        lw = self.loss_weights
        res = self.vocab_loss(
            heads,
            self.target_rows(batch, out, sel),
            VocabLossTerms(ce=lw["ce"] * wn, l1=lw["l1"] * wn),
            labels=out.labels[sel],
            bias=getattr(self.target.lm_head, "bias", None),
        )
        assert res.ce is not None and res.l1 is not None
        acc = (1.0 - 0.5 * res.l1).clamp(0.0, 1.0)  # confidence target 1 - TV (detached)
        loss = res.loss  # = w_ce * masked_mean(ce, w) + w_l1 * masked_mean(l1, w)
        terms = {"ce": masked_mean(res.ce, w), "l1": masked_mean(res.l1, w)}  # detached, for the metrics
        if self.confidence_head is not None:
            conf_logit = self.confidence_logit(h, prev).float()
            bce = F.binary_cross_entropy_with_logits(conf_logit, acc, reduction="none")
            terms["bce"] = masked_mean(bce, torch.ones_like(bce))
            loss = loss + lw["bce"] * terms["bce"]
        acc_grid = torch.zeros(out.valid.shape, device=acc.device)
        acc_grid[sel] = acc
        metrics = {k: float(v.detach()) for k, v in terms.items()}
        metrics["loss"] = float(loss.detach())
        metrics["anchors"] = float(out.anchor_valid.sum())
        return DraftOutput(
            loss=loss, metrics=metrics, position_acceptance=position_acceptance(acc_grid, out.valid)
        )

    def draft_config(self) -> dict[str, Any]:
        cfg = super().draft_config()
        cfg["architectures"] = ["DSparkDraftModel"]
        cfg.update(
            {
                "markov_rank": self.cfg.markov_rank,
                "markov_head_type": self.cfg.markov_head,
                "enable_confidence_head": self.confidence_head is not None,
                "confidence_head_with_markov": True,
            }
        )
        return cfg

    def as_drafter(self, target: TargetModel | None = None) -> DSparkDrafter:
        if target is not None:
            self.check_same_target(target)
        return DSparkDrafter(self)


class DSparkDrafter(DFlashDrafter):
    """One backbone forward per block, then the sequential head samples slot by slot, left to right."""

    model: DSparkDraft

    @torch.no_grad()
    def _sequential(self, anchor: int, steps: int, choose) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        m = self.model
        hidden = self.block_hidden(anchor)[:steps]  # [g, H]
        base = m.target_lm_head(hidden).float()
        head = m.markov_head
        prev = torch.tensor([int(anchor)], device=hidden.device)
        state = hidden.new_zeros(1, head.rank, dtype=m.param_dtype)
        logits_out, conf_out = [], []
        for k in range(steps):
            e = head.markov_w1(prev)  # [1, r]
            if head.kind == "rnn":
                state = head.rnn(e, state)
                s = state
            else:
                s = e
            logits = base[k] + head.bias(s)[0].float()
            logits_out.append(logits)
            if m.confidence_head is not None:
                conf_out.append(torch.sigmoid(m.confidence_logit(hidden[k : k + 1], prev).float())[0])
            prev = torch.tensor([choose(k, logits)], device=hidden.device)
        return logits_out, conf_out

    def propose(
        self, anchor: int, num_proposals: int, temperature: float, generator: torch.Generator | None = None
    ) -> Proposal:
        g = min(int(num_proposals), self.model.block_size)
        tokens: list[int] = []
        probs: list[torch.Tensor] = []

        def choose(_k: int, logits: torch.Tensor) -> int:
            tok, p = sample_from_logits(logits[None], temperature, generator)
            tokens.append(int(tok[0]))
            probs.append(p[0])
            return tokens[-1]

        _, conf = self._sequential(anchor, g, choose)
        return Proposal(
            tokens=torch.tensor(tokens, dtype=torch.long),
            probs=torch.stack(probs),
            confidence=torch.stack(conf).cpu() if conf else None,
        )

    def teacher_forced_logits(self, anchor: int, next_tokens: list[int]) -> torch.Tensor:
        """Slot logits [len(next_tokens), V] when the sequential head is fed ``next_tokens``."""
        logits, _ = self._sequential(anchor, len(next_tokens), lambda k, _lg: int(next_tokens[k]))
        return torch.stack(logits)
