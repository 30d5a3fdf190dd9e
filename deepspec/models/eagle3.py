"""Eagle3: an autoregressive one-layer draft on fused target features, trained with training-time test.

Weight layout follows SGLang's ``LlamaForCausalLMEagle3`` (so export is a rename-free copy)::

    fc                       Linear(k*H -> H)     fuses the k captured target layers
    midlayer.input_layernorm RMSNorm(H)           on the token embedding
    midlayer.hidden_norm     RMSNorm(H)           on the incoming hidden state
    midlayer.self_attn.{q,k,v,o}_proj             q/k/v read the 2H-wide concat(emb, hidden)
    midlayer.post_attention_layernorm, midlayer.mlp.{gate,up,down}_proj
    norm, lm_head            RMSNorm(H), Linear(H -> draft vocab)
    d2t, t2d                 reduced-vocabulary maps: target_id = i + d2t[i]; t2d[target_id] = in draft vocab

Data alignment ("pair" j): the draft reads the target feature of position j and the embedding of token
x_{j+1}, and predicts x_{j+2}; its target distribution is the target's own next-token distribution at
position j+1. Training-time test (TTT) unrolls step k = 0..K-1 on the draft's own outputs: step k at pair j
reads the step k-1 output hidden of pair j and the (ground-truth, shifted) token x_{j+1+k}, sits at RoPE
position j+k, attends to the step-0 keys of pairs <= j plus the keys of steps 1..k of pair j (exactly what the
drafter's cache holds at inference), and predicts x_{j+2+k} with loss weight decay^k.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deepspec.models.base import Proposal, sample_from_logits
from deepspec.models.draft import DraftBatch, DraftModel, DraftOutput, packed_causal_mask
from deepspec.models.layers import MLP, Attention, DraftDims, KVCache, RMSNorm, RotaryEmbedding, sdpa
from deepspec.models.vocab_loss import VocabLossTerms, position_acceptance

if TYPE_CHECKING:
    from deepspec.config import DraftModelConfig
    from deepspec.target_model.model import TargetModel


# --------------------------------------------------------------------------------------------------
# Reduced draft vocabulary
# --------------------------------------------------------------------------------------------------


def build_vocab_mapping(
    token_counts: torch.Tensor, draft_vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``draft_vocab_size`` most frequent target tokens.

    token_counts: [V] supervised-token counts of the training data
    (:func:`deepspec.data.sequences.token_frequencies`). Ties go to the lower token id.
    Returns ``d2t`` [draft_vocab_size] long with ``d2t[i] = target_id - i`` (draft ids sorted by target id)
    and ``t2d`` [V] bool, True for target ids in the draft vocabulary (SGLang / EAGLE-3 convention).
    """
    counts = torch.as_tensor(token_counts).reshape(-1).double()
    vocab = counts.numel()
    if not 1 < draft_vocab_size <= vocab:
        raise ValueError(
            f"draft_vocab_size must be in [2, {vocab}] (the target vocabulary), got {draft_vocab_size}"
        )
    order = torch.sort(-counts, stable=True).indices  # descending count, ascending id on ties
    ids = torch.sort(order[:draft_vocab_size]).values
    d2t = ids - torch.arange(draft_vocab_size)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    return d2t.long(), t2d


# --------------------------------------------------------------------------------------------------
# The decoder layer
# --------------------------------------------------------------------------------------------------


class Eagle3DecoderLayer(nn.Module):
    """One Llama decoder layer whose attention reads concat(norm(embedding), norm(hidden)) (2H wide)."""

    def __init__(self, dims: DraftDims):
        super().__init__()
        h = dims.hidden_size
        self.input_layernorm = RMSNorm(h, dims.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, dims.rms_norm_eps)
        self.self_attn = Attention(dims, input_size=2 * h)
        self.post_attention_layernorm = RMSNorm(h, dims.rms_norm_eps)
        self.mlp = MLP(h, dims.intermediate_size)

    def attn_input(self, emb: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.input_layernorm(emb), self.hidden_norm(hidden)], dim=-1)  # [B, T, 2H]

    def finish(self, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual over the incoming hidden state, then the MLP block. attn: [B, heads, T, d]."""
        h = hidden + self.self_attn.output(attn)
        return h + self.mlp(self.post_attention_layernorm(h))


def ttt_attention(
    q: torch.Tensor,
    k0: torch.Tensor,
    v0: torch.Tensor,
    k_diag: list[torch.Tensor],
    v_diag: list[torch.Tensor],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of unroll step k >= 1 over the step-0 cache (causal) and steps 1..k at the same pair.

    q: [B, H, T, d]; k0/v0: [B, Hkv, T, d] (step-0 keys of every pair); k_diag/v_diag: k tensors of
    [B, Hkv, T, d] (steps 1..k; entry j only visible to query j). Exact softmax over all visible keys.
    mask: bool [B, 1, T, T] over the step-0 keys (packed rows: causal inside each sequence), default causal.
    """
    groups = q.shape[1] // k0.shape[1]

    def rep(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(groups, dim=1) if groups > 1 else x

    t = q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores0 = torch.matmul(q, rep(k0).transpose(-1, -2)).float() * scale  # [B, H, T, T]
    if mask is None:
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores0 = scores0.masked_fill(~mask, float("-inf"))
    diag = [(q.float() * rep(k).float()).sum(-1, keepdim=True) * scale for k in k_diag]  # each [B, H, T, 1]
    probs = torch.softmax(torch.cat([scores0, *diag], dim=-1), dim=-1)
    out = torch.matmul(probs[..., :t].to(v0.dtype), rep(v0)).float()
    for i, v in enumerate(v_diag):
        out = out + probs[..., t + i : t + i + 1] * rep(v).float()
    return out.to(q.dtype)


def _shift_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T] -> [B, T] with out[:, j] = x[:, j + n] (zeros past the end)."""
    if n == 0:
        return x
    out = torch.zeros_like(x)
    if n < x.shape[1]:
        out[:, : x.shape[1] - n] = x[:, n:]
    return out


# --------------------------------------------------------------------------------------------------
# The draft
# --------------------------------------------------------------------------------------------------


class Eagle3Draft(DraftModel):
    algorithm = "eagle3"

    def __init__(self, cfg: DraftModelConfig, target: TargetModel):
        super().__init__(cfg, target)
        if (cfg.num_layers or 1) != 1:
            raise ValueError(
                f"draft.num_layers must be 1 for eagle3 (got {cfg.num_layers}): SGLang's Eagle3 has one layer"
            )
        d = self.dims
        self.draft_vocab_size = int(cfg.draft_vocab_size or d.vocab_size)
        if self.draft_vocab_size > d.vocab_size:
            raise ValueError(
                f"draft.draft_vocab_size {self.draft_vocab_size} exceeds the target vocabulary {d.vocab_size}"
            )
        device = target.lm_head.weight.device
        self.fc = nn.Linear(self.num_features * d.hidden_size, d.hidden_size, bias=False)
        self.midlayer = Eagle3DecoderLayer(d)
        self.norm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        self.lm_head = nn.Linear(d.hidden_size, self.draft_vocab_size, bias=False)
        self.rotary = RotaryEmbedding(d.head_dim, d.rope_parameters, target.config)
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(d.vocab_size, dtype=torch.bool))
        self.to(device)
        # full vocabulary, or a placeholder (the first ids) until set_vocab_mapping installs the mapping that
        # build_vocab_mapping makes from the data's token counts
        d2t = torch.zeros(self.draft_vocab_size, dtype=torch.long)
        t2d = torch.zeros(d.vocab_size, dtype=torch.bool)
        t2d[: self.draft_vocab_size] = True
        self.set_vocab_mapping(d2t, t2d)

    # ---- vocabulary -------------------------------------------------------------------------------

    @torch.no_grad()
    def set_vocab_mapping(self, d2t: torch.Tensor, t2d: torch.Tensor, init_lm_head: bool = True) -> None:
        """Install ``d2t``/``t2d`` (see :func:`build_vocab_mapping`) and copy the target's LM-head rows."""
        if d2t.shape != self.d2t.shape or t2d.shape != self.t2d.shape:
            raise ValueError(
                f"vocab mapping shapes {tuple(d2t.shape)}/{tuple(t2d.shape)} do not match "
                f"draft vocab {self.draft_vocab_size} / target vocab {self.dims.vocab_size}"
            )
        ids = torch.arange(self.draft_vocab_size, device=d2t.device) + d2t
        if int(t2d.sum()) != self.draft_vocab_size or not bool(t2d.to(ids.device)[ids].all()):
            raise ValueError("inconsistent vocab mapping: t2d must mark exactly the target ids i + d2t[i]")
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)
        if init_lm_head:
            w = self.target.lm_head.weight
            self.lm_head.weight.copy_(w[ids.to(w.device)].to(self.lm_head.weight))

    @property
    def draft_ids(self) -> torch.Tensor:
        """[Vd] target id of each draft id."""
        return torch.arange(self.draft_vocab_size, device=self.d2t.device) + self.d2t

    # ---- training ---------------------------------------------------------------------------------

    def unroll(
        self,
        input_ids: torch.Tensor,
        features: torch.Tensor,
        steps: int,
        position_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Efficient TTT unroll: the output hidden states [B, T, H] of steps 0..steps-1 (pre final norm).

        position_ids: [B, T] positions restarting at 0 for each sequence of a packed row (see
        :class:`DraftBatch`): attention then stays inside each sequence; None: one sequence per row.
        """
        _b, t = input_ids.shape
        layer = self.midlayer
        hidden = self.fc(features.to(self.param_dtype))  # [B, T, H]
        pos = torch.arange(t, device=input_ids.device) if position_ids is None else position_ids
        mask = None if position_ids is None else packed_causal_mask(position_ids)  # [B, 1, T, T]
        k0 = v0 = None
        k_diag: list[torch.Tensor] = []
        v_diag: list[torch.Tensor] = []
        outs: list[torch.Tensor] = []
        for k in range(steps):
            emb = self.embed(_shift_left(input_ids, 1 + k))  # token x_{j+1+k}
            cos, sin = self.rotary(pos + k)
            x = layer.attn_input(emb, hidden)
            q = layer.self_attn.project_q(x, cos, sin)
            kk, vv = layer.self_attn.project_kv(x, cos, sin)
            if k == 0:
                k0, v0 = kk, vv
                attn = sdpa(q, kk, vv, mask=mask, is_causal=True)
            else:
                k_diag.append(kk)
                v_diag.append(vv)
                attn = ttt_attention(q, k0, v0, k_diag, v_diag, mask)  # type: ignore[arg-type]
            hidden = layer.finish(hidden, attn)
            outs.append(hidden)
        return outs

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits from output hidden states."""
        return self.lm_head(self.norm(hidden))

    def forward(self, batch: DraftBatch) -> DraftOutput:
        steps, decay = self.cfg.ttt_steps, self.cfg.ttt_decay
        b, t = batch.input_ids.shape
        sup = batch.supervised()  # [B, T]: token t is supervised
        seg = batch.segments()  # packed rows: pair j's shifted tokens and targets must be in its own sequence
        outs = self.unroll(batch.input_ids, batch.features, steps, batch.position_ids)
        # Rows of all unroll steps go through one chunked LM-head loss. Step k, pair j predicts x_{j+2+k}; its
        # target distribution is the target's next-token distribution at position j+1+k.
        xs, target_hidden, coefs, step_rows, valids = [], [], [], [], []
        for k, out in enumerate(outs):
            valid = _shift_left(sup.long(), 2 + k).bool() & (_shift_left(seg, 2 + k) == seg)  # [B, T]
            bi, j = valid.nonzero(as_tuple=True)
            xs.append(self.norm(out[bi, j]))  # [n_k, H] LM-head input
            target_hidden.append(batch.target_last_hidden[bi, j + 1 + k])
            n_k = bi.numel()
            coefs.append(torch.full((n_k,), decay**k / max(n_k, 1), device=sup.device))
            step_rows.append((bi, j))
            valids.append(valid)
        full_vocab = self.draft_vocab_size == self.dims.vocab_size and not bool(self.d2t.any())
        res = self.vocab_loss(
            [(torch.cat(xs), self.lm_head.weight)],
            torch.cat(target_hidden),
            VocabLossTerms(soft_ce=torch.cat(coefs)),  # sum_k decay^k * mean soft CE of step k
            target_ids=None if full_vocab else self.draft_ids,
        )
        assert res.soft_ce is not None
        total = res.loss
        metrics: dict[str, float] = {}
        accs = []
        start = 0
        with torch.no_grad():
            for k, (bi, j) in enumerate(step_rows):
                end = start + bi.numel()
                acc_full = torch.zeros(b, t, device=sup.device)
                acc_full[bi, j] = 1.0 - res.tv[start:end]
                accs.append(acc_full)
                metrics[f"ce_{k}"] = float(res.soft_ce[start:end].mean()) if end > start else 0.0
                start = end
        acc = position_acceptance(torch.stack(accs, -1), torch.stack(valids, -1))
        metrics["loss"] = float(total.detach())
        metrics["ce"] = metrics["ce_0"]
        metrics["acc_0"] = float(acc[0])
        return DraftOutput(loss=total, metrics=metrics, position_acceptance=acc)

    # ---- export / inference -----------------------------------------------------------------------

    def draft_config(self) -> dict[str, Any]:
        cfg = self.common_config()
        cfg.update(
            {
                "architectures": ["LlamaForCausalLMEagle3"],
                "model_type": "llama",
                "num_hidden_layers": 1,
                "draft_vocab_size": self.draft_vocab_size,
                "eagle_config": {
                    "eagle_aux_hidden_state_layer_ids": self.target_layer_ids,
                    "use_aux_hidden_state": True,
                },
                # vLLM's V1 runner reads this top-level key as "input of layer i" = output of layer i-1
                "eagle_aux_hidden_state_layer_ids": [i + 1 for i in self.target_layer_ids],
                "target_hidden_size": self.dims.hidden_size,
                "deepspec": self.deepspec_section(),
            }
        )
        return cfg

    def as_drafter(self, target: TargetModel | None = None) -> Eagle3Drafter:
        if target is not None:
            self.check_same_target(target)
        return Eagle3Drafter(self)


# --------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------


class Eagle3Drafter:
    """Batch-1 Eagle3 drafter with its own KV cache (see :mod:`deepspec.models.base`).

    Committed pairs (feature f_j, token x_{j+1}) have their keys/values cached once. The last extended
    feature waits (``pending``) for its next token: the anchor of :meth:`propose`, or the first token of
    the next :meth:`extend`. Proposing unrolls step by step on the draft's own outputs; its keys live only
    in a local list, so the committed cache is never modified.
    """

    def __init__(self, model: Eagle3Draft):
        self.model = model
        self.cache = KVCache(1)
        self.pending: torch.Tensor | None = None  # [1, 1, H] fc(feature) of the last committed position
        self.num_pairs = 0

    def reset(self) -> None:
        self.cache.reset()
        self.pending = None
        self.num_pairs = 0

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        m = self.model
        if tokens.numel() == 0:
            return
        if features.shape[0] != tokens.numel():
            raise ValueError(f"extend: {tokens.numel()} tokens but {features.shape[0]} feature rows")
        dev = m.param_device
        tokens = tokens.reshape(-1).to(dev)
        hidden = m.fc(features.to(dev, m.param_dtype))[None]  # [1, n, H]
        if self.pending is not None:
            pair_hidden, pair_tokens = torch.cat([self.pending, hidden[:, :-1]], dim=1), tokens
        else:
            pair_hidden, pair_tokens = hidden[:, :-1], tokens[1:]
        n = pair_tokens.numel()
        if n:
            pos = torch.arange(self.num_pairs, self.num_pairs + n, device=dev)
            cos, sin = m.rotary(pos)
            x = m.midlayer.attn_input(m.embed(pair_tokens[None]), pair_hidden)
            k, v = m.midlayer.self_attn.project_kv(x, cos, sin)
            self.cache.append(0, k, v)
            self.cache.commit(n)
            self.num_pairs += n
        self.pending = hidden[:, -1:]

    @torch.no_grad()
    def _unroll(
        self, anchor: int, steps: int, choose: Callable[[int, torch.Tensor], int]
    ) -> list[torch.Tensor]:
        """Run ``steps`` draft steps from the anchor; ``choose(step, logits[Vd])`` gives the next target id.

        Returns the draft-vocabulary logits of every step.
        """
        m = self.model
        if self.pending is None:
            raise RuntimeError(
                "propose() before extend(): the drafter needs the features of the committed prefix"
            )
        dev = m.param_device
        attn_mod = m.midlayer.self_attn
        hidden, token = self.pending, anchor
        spec_k: list[torch.Tensor] = []
        spec_v: list[torch.Tensor] = []
        cached = self.cache.get(0)
        all_logits = []
        for step in range(steps):
            pos = torch.tensor([self.num_pairs + step], device=dev)
            cos, sin = m.rotary(pos)
            x = m.midlayer.attn_input(m.embed(torch.tensor([[token]], device=dev)), hidden)
            q = attn_mod.project_q(x, cos, sin)
            k, v = attn_mod.project_kv(x, cos, sin)
            spec_k.append(k)
            spec_v.append(v)
            keys = ([cached[0]] if cached else []) + spec_k
            vals = ([cached[1]] if cached else []) + spec_v
            attn = sdpa(q, torch.cat(keys, dim=2), torch.cat(vals, dim=2))
            hidden = m.midlayer.finish(hidden, attn)
            logits = m.logits(hidden)[0, 0]  # [Vd]
            all_logits.append(logits)
            token = choose(step, logits)
        return all_logits

    def propose(
        self, anchor: int, num_proposals: int, temperature: float, generator: torch.Generator | None = None
    ) -> Proposal:
        m = self.model
        ids = m.draft_ids
        tokens: list[int] = []
        probs_rows: list[torch.Tensor] = []

        def choose(_step: int, logits: torch.Tensor) -> int:
            tok, probs = sample_from_logits(logits[None], temperature, generator)
            full = torch.zeros(m.dims.vocab_size, device=logits.device)
            full[ids] = probs[0]
            target_id = int(ids[tok[0]])
            tokens.append(target_id)
            probs_rows.append(full)
            return target_id

        self._unroll(int(anchor), num_proposals, choose)
        return Proposal(tokens=torch.tensor(tokens, dtype=torch.long), probs=torch.stack(probs_rows))

    def teacher_forced_logits(self, anchor: int, next_tokens: list[int]) -> torch.Tensor:
        """Logits [len(next_tokens), Vd] of an unroll fed ``next_tokens`` instead of its own proposals."""
        logits = self._unroll(int(anchor), len(next_tokens), lambda step, _lg: int(next_tokens[step]))
        return torch.stack(logits)
