"""DFlash: a parallel block drafter whose layers read the target's context features as extra keys/values.

Weight layout follows SGLang's ``DFlashDraftModel`` (no embedding / LM head: both are the target's)::

    fc, hidden_norm          Linear(k*H -> H), RMSNorm(H): context features -> ctx  [T, H]
    layers.{i}.input_layernorm, layers.{i}.self_attn.{q,k,v,o}_proj, .q_norm, .k_norm (Qwen3-style)
    layers.{i}.post_attention_layernorm, layers.{i}.mlp.{gate,up,down}_proj
    norm                     final RMSNorm before the target's LM head

A block for anchor position a is ``[x_a, MASK x (block_size-1)]`` at RoPE positions a..a+block_size-1, the
serving engines' layout. **Slot convention** (what SGLang and vLLM run for ``DFlashDraftModel``): slot 0, the
anchor, is not predicted; mask slot j = 1..block_size-1 predicts the token *at* its own position a+j, so one
block proposes block_size-1 tokens (SGLang ``speculative/dflash_worker{,_v2}.py`` sample block positions 1:;
vLLM ``v1/spec_decode/utils.py`` samples the query offsets > 0; see :mod:`deepspec.export.engines`).
DSpark (:mod:`deepspec.models.dspark`) shares the backbone with its own convention: every slot k predicts
a+k+1, the anchor slot included (:attr:`DFlashDraft.anchor_predicts`).

In every layer, queries come from the block only, and ``K = [W_k ctx_{<a} ; W_k h_block]`` (same for V):
block tokens attend bidirectionally within their block and to the context strictly before the anchor.
Training packs many anchors of a sequence into one pass with a block attention mask (flex attention on CUDA
when available, SDPA with a dense boolean mask otherwise). Loss: cross-entropy weighted exp(-i/loss_decay)
on the supervised prefix of each block's predictions i = 0, 1, ... (token a+i+1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deepspec.models.base import Proposal, sample_from_logits
from deepspec.models.draft import DraftBatch, DraftModel, DraftOutput
from deepspec.models.layers import (
    MLP,
    Attention,
    DraftDims,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    sdpa,
    text_config,
)
from deepspec.models.vocab_loss import VocabLossTerms, position_acceptance

if TYPE_CHECKING:
    from deepspec.config import DraftModelConfig
    from deepspec.target_model.model import TargetModel

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Anchors and the block attention mask
# --------------------------------------------------------------------------------------------------


def sample_anchors(
    supervised: torch.Tensor, num_anchors: int, segments: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick up to ``num_anchors`` anchors per sequence among positions a whose next token is supervised.

    supervised: [B, T] bool. segments: [B, T] sequence index of each token in a packed row
    (:meth:`DraftBatch.segments`), None when every row holds one sequence. Returns anchors [B, N] (sorted;
    padding entries are 0) and valid [B, N] bool, N = the most anchors of a row. Uses the global torch RNG
    of the device, so a trainer that restores RNG state replays the same anchors.
    """
    if segments is not None:
        return _sample_packed_anchors(supervised, num_anchors, segments)
    b, t = supervised.shape
    eligible = torch.zeros_like(supervised)
    eligible[:, :-1] = supervised[:, 1:]
    n = int(min(num_anchors, int(eligible.sum(1).max()) if b else 0))
    if n == 0:
        z = torch.zeros(b, 0, dtype=torch.long, device=supervised.device)
        return z, z.bool()
    scores = torch.rand(b, t, device=supervised.device).masked_fill(~eligible, -1.0)
    top, idx = scores.topk(n, dim=1)
    valid = top >= 0
    anchors = torch.where(valid, idx, torch.zeros_like(idx))
    order = torch.where(valid, anchors, torch.full_like(anchors, t)).argsort(dim=1)  # valid first, ascending
    return anchors.gather(1, order), valid.gather(1, order)


def _sample_packed_anchors(
    supervised: torch.Tensor, num_anchors: int, segments: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_anchors` on packed rows: up to ``num_anchors`` per *sequence*, none whose next token
    lies in the following sequence."""
    b, t = supervised.shape
    dev = supervised.device
    eligible = torch.zeros_like(supervised)
    eligible[:, :-1] = supervised[:, 1:] & (segments[:, 1:] == segments[:, :-1])
    scores = torch.rand(b, t, device=dev)
    # rank of each eligible position among its sequence's, by descending score: order by (sequence, -score)
    key = segments.double() * 4 + torch.where(eligible, 1.0 - scores.double(), 2.0)
    order = key.argsort(dim=1)
    seg_sorted = segments.gather(1, order)
    idx = torch.arange(t, device=dev).expand(b, t)
    starts = torch.where(seg_sorted != seg_sorted.roll(1, dims=1), idx, torch.zeros_like(idx))
    starts[:, 0] = 0
    rank_sorted = idx - starts.cummax(dim=1).values  # rank inside the sequence's run of the sorted order
    rank = torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)
    chosen = eligible & (rank < num_anchors)
    n = int(chosen.sum(1).max()) if b else 0
    by_position = torch.where(chosen, idx, torch.full_like(idx, t)).sort(dim=1).values[:, :n]  # ascending
    valid = by_position < t
    return torch.where(valid, by_position, torch.zeros_like(by_position)), valid


def build_block_mask(
    anchors: torch.Tensor, seq_len: int, block_size: int, starts: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense boolean mask [B, N*gamma, T + N*gamma] for packed blocks (True = may attend).

    Query slot i belongs to block n = i // gamma with anchor a_n. Keys 0..T-1 are the context positions
    (allowed iff start_n <= position < a_n, start_n the first position of the anchor's sequence: 0 unless
    ``starts`` [B, N] gives it for packed rows); keys T + j are block slots (allowed iff slot j is in the
    same block).
    """
    b, n = anchors.shape
    g = block_size
    dev = anchors.device
    q_block = torch.arange(n * g, device=dev) // g  # [Nq]
    kv = torch.arange(seq_len, device=dev)[None, None, :]
    ctx = kv < anchors[:, q_block][:, :, None]  # [B, Nq, T]
    if starts is not None:
        ctx &= kv >= starts[:, q_block][:, :, None]
    same = q_block[:, None] == q_block[None, :]  # [Nq, Nq]
    return torch.cat([ctx, same[None].expand(b, -1, -1)], dim=2)


_FLEX: Any = None  # compiled flex_attention, or False when unavailable


def _flex_attention():
    global _FLEX
    if _FLEX is None:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            _FLEX = (torch.compile(flex_attention), create_block_mask)
        except Exception as e:  # pragma: no cover - depends on the torch build
            log.warning("flex_attention unavailable (%s); using SDPA with a dense mask", e)
            _FLEX = False
    return _FLEX


def block_flex_mask(
    anchors: torch.Tensor, seq_len: int, block_size: int, starts: torch.Tensor | None = None
):  # pragma: no cover - CUDA only
    """The same pattern as :func:`build_block_mask` as a flex-attention BlockMask."""
    _, create_block_mask = _flex_attention()
    b, n = anchors.shape
    g, t = block_size, seq_len
    first = torch.zeros_like(anchors) if starts is None else starts

    def mask_mod(bi, _h, q_idx, kv_idx):
        blk = q_idx // g
        in_ctx = (kv_idx < t) & (kv_idx < anchors[bi, blk]) & (kv_idx >= first[bi, blk])
        in_blk = (kv_idx >= t) & ((kv_idx - t) // g == blk)
        return in_ctx | in_blk

    return create_block_mask(mask_mod, b, None, n * g, t + n * g, device=anchors.device)


# --------------------------------------------------------------------------------------------------
# The decoder layer
# --------------------------------------------------------------------------------------------------


class DFlashDecoderLayer(nn.Module):
    def __init__(self, dims: DraftDims):
        super().__init__()
        self.input_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps)
        self.self_attn = Attention(dims, qk_norm=True)
        self.post_attention_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps)
        self.mlp = MLP(dims.hidden_size, dims.intermediate_size)

    def forward(
        self,
        h: torch.Tensor,  # [B, Nq, H] block hidden states
        rope_q: tuple[torch.Tensor, torch.Tensor],  # block positions
        ctx_kv: tuple[torch.Tensor, torch.Tensor] | None,  # [B, Hkv, Tc, d] this layer's context keys/values
        mask: Any = None,  # dense bool [B, 1, Nq, Tc + Nq], a flex BlockMask, or None (attend to all)
        context: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """``context`` (projected context states [B, Tc, H] and their rope) instead of ``ctx_kv``: the keys and
        values are projected here, inside this layer's forward, so that FSDP2 can shard each layer apart."""
        if context is not None:
            ctx_kv = self.self_attn.project_kv(context[0], *context[1])
        x = self.input_layernorm(h)
        q = self.self_attn.project_q(x, *rope_q)
        k, v = self.self_attn.project_kv(x, *rope_q)
        if ctx_kv is not None:
            k, v = torch.cat([ctx_kv[0], k], dim=2), torch.cat([ctx_kv[1], v], dim=2)
        if mask is not None and not isinstance(mask, torch.Tensor):  # flex BlockMask (CUDA)
            flex, _ = _flex_attention()
            attn = flex(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        else:
            attn = sdpa(q, k, v, mask=mask)
        h = h + self.self_attn.output(attn)
        return h + self.mlp(self.post_attention_layernorm(h))


def default_mask_token_id(config: Any) -> int:
    """A reserved token whose (frozen) target embedding fills the mask slots.

    The pad token when the config has one distinct from BOS/EOS, else the last embedding row (padded,
    unused rows in Qwen-style vocabularies).
    """
    c = text_config(config)
    pad = getattr(c, "pad_token_id", None)
    specials = {getattr(c, "bos_token_id", None)}
    eos = getattr(c, "eos_token_id", None)
    specials.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if isinstance(pad, int) and pad not in specials:
        return pad
    return int(c.vocab_size) - 1


@dataclass
class BlockForward:
    """Backbone outputs of packed blocks, one row per *prediction* i = 0..P-1 (P = proposals per block)."""

    hidden: torch.Tensor  # [B, N, P, H] final normed hidden (LM-head input) of the slot predicting a+i+1
    labels: torch.Tensor  # [B, N, P] token a+i+1 (0 outside the sequence)
    prev_tokens: torch.Tensor  # [B, N, P] token a+i (the input of prediction i's sequential head)
    target_pos: torch.Tensor  # [B, N, P] position a+i (target logits there predict a+i+1)
    valid: torch.Tensor  # [B, N, P] bool: supervised prefix of each block
    anchor_valid: torch.Tensor  # [B, N] bool: real anchors (not padding)


# --------------------------------------------------------------------------------------------------
# The draft
# --------------------------------------------------------------------------------------------------


class DFlashDraft(DraftModel):
    algorithm = "dflash"
    #: False (DFlash, the engines' convention): slot 0 is the anchor and is not predicted, mask slot j predicts
    #: the token at a+j. True (DSpark): every slot k, the anchor's included, predicts a+k+1.
    anchor_predicts = False

    def __init__(self, cfg: DraftModelConfig, target: TargetModel, mask_token_id: int | None = None):
        super().__init__(cfg, target)
        d = self.dims
        self.block_size = int(cfg.block_size)
        self.num_layers = int(cfg.num_layers or 5)
        self.mask_token_id = int(
            default_mask_token_id(target.config) if mask_token_id is None else mask_token_id
        )
        if not 0 <= self.mask_token_id < d.vocab_size:
            raise ValueError(
                f"mask_token_id {self.mask_token_id} outside the target vocabulary [0, {d.vocab_size})"
            )
        self.fc = nn.Linear(self.num_features * d.hidden_size, d.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashDecoderLayer(d) for _ in range(self.num_layers))
        self.norm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        self.rotary = RotaryEmbedding(d.head_dim, d.rope_parameters, target.config)
        self.attention_backend = "auto"  # "auto" (flex on CUDA) | "sdpa" | "flex"
        self.to(target.lm_head.weight.device)

    @property
    def first_predicting_slot(self) -> int:
        return 0 if self.anchor_predicts else 1

    @property
    def slot_convention(self) -> str:
        """What each block slot was trained to predict, recorded in exports (checked against the engines)."""
        return "slot k predicts anchor+k+1" if self.anchor_predicts else "mask slot j predicts anchor+j"

    @property
    def proposals_per_block(self) -> int:
        """Tokens one block proposes: block_size - 1 for DFlash, block_size for DSpark."""
        return self.block_size - self.first_predicting_slot

    # ---- backbone ---------------------------------------------------------------------------------

    def context(self, features: torch.Tensor) -> torch.Tensor:
        """Projected context features [..., T, H]."""
        return self.hidden_norm(self.fc(features.to(self.param_dtype)))

    def _use_flex(self, device: torch.device) -> bool:
        if self.attention_backend == "sdpa" or device.type != "cuda":
            return False
        return bool(_flex_attention())

    def block_forward(
        self, batch: DraftBatch, anchors: torch.Tensor, anchor_valid: torch.Tensor
    ) -> BlockForward:
        """Run all blocks of a batch in one pass. anchors/anchor_valid: [B, N]."""
        b, t = batch.input_ids.shape
        g = self.block_size
        n = anchors.shape[1]
        dev = batch.input_ids.device
        slot = torch.arange(g, device=dev)
        positions = batch.positions()  # [B, T] inside each sequence (packed rows restart at 0)
        anchor_pos = positions.gather(1, anchors)  # [B, N]
        pos = anchor_pos[:, :, None] + slot  # [B, N, g] positions a..a+g-1 of the anchor's sequence
        # packed rows: the first row index of each anchor's sequence (its context starts there)
        starts = anchors - anchor_pos if batch.packed else None
        # block input: the anchor token, then mask tokens
        block_ids = torch.full((b, n, g), self.mask_token_id, dtype=torch.long, device=dev)
        block_ids[:, :, 0] = batch.input_ids.gather(1, anchors)
        h = self.embed(block_ids.view(b, n * g))  # [B, Nq, H]
        rope_q = self.rotary(pos.view(b, n * g))
        ctx = self.context(batch.features)  # [B, T, H]
        rope_c = self.rotary(positions if batch.packed else torch.arange(t, device=dev))

        def run_layers(mask: Any) -> torch.Tensor:
            x = h
            for layer in self.layers:
                x = layer(x, rope_q, None, mask, context=(ctx, rope_c))
            return x

        out = None
        if self._use_flex(dev):
            try:
                out = run_layers(block_flex_mask(anchors, t, g, starts))
            except Exception as e:  # pragma: no cover - compile failures on some CUDA stacks
                global _FLEX
                log.warning(
                    "flex attention failed (%s: %s); falling back to SDPA with a dense mask",
                    type(e).__name__,
                    e,
                )
                _FLEX = False
        if out is None:
            out = run_layers(build_block_mask(anchors, t, g, starts)[:, None])  # mask [B, 1, Nq, T + Nq]
        first = self.first_predicting_slot
        hidden = self.norm(out).view(b, n, g, -1)[:, :, first:]  # [B, N, P, H]

        # prediction i reads slot first+i and predicts token a+i+1; it counts iff a+1..a+i+1 are all supervised
        p = g - first
        prev_pos = anchors[:, :, None] + torch.arange(p, device=dev)  # [B, N, P] positions a+i
        lab_pos = prev_pos + 1
        inside = lab_pos < t
        lab_pos_c = lab_pos.clamp(max=t - 1).view(b, n * p)
        if batch.packed:  # a label in the next sequence of the row is outside this one
            seg = batch.segments()
            inside &= seg.gather(1, lab_pos_c).view(b, n, p) == seg.gather(1, anchors)[:, :, None]
        labels = batch.input_ids.gather(1, lab_pos_c).view(b, n, p).masked_fill(~inside, 0)
        sup = batch.supervised().gather(1, lab_pos_c).view(b, n, p) & inside
        valid = sup.long().cumprod(dim=-1).bool() & anchor_valid[:, :, None]
        prev_c = prev_pos.clamp(max=t - 1)
        prev = batch.input_ids.gather(1, prev_c.view(b, n * p)).view(b, n, p)
        return BlockForward(
            hidden=hidden,
            labels=labels,
            prev_tokens=prev,
            target_pos=prev_c,
            valid=valid,
            anchor_valid=anchor_valid,
        )

    def slot_weights(self, valid: torch.Tensor) -> torch.Tensor:
        """exp(-i / loss_decay) on the supervised prefix, 0 elsewhere. valid: [..., P]."""
        k = torch.arange(valid.shape[-1], device=valid.device, dtype=torch.float32)
        return torch.exp(-k / self.cfg.loss_decay) * valid.float()

    def target_rows(
        self, batch: DraftBatch, out: BlockForward, sel: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """The target's final hidden state [n, H] whose logits give each selected slot's target distribution."""
        return batch.target_last_hidden[sel[0], out.target_pos[sel]]

    def training_blocks(
        self, batch: DraftBatch, anchors: torch.Tensor | None, anchor_valid: torch.Tensor | None
    ) -> BlockForward:
        """Run the blocks of the given anchors (default: ``num_anchors`` sampled supervised positions)."""
        if anchors is None:
            segments = batch.segments() if batch.packed else None
            anchors, anchor_valid = sample_anchors(batch.supervised(), self.cfg.num_anchors, segments)
        elif anchor_valid is None:
            anchor_valid = torch.ones_like(anchors, dtype=torch.bool)
        return self.block_forward(batch, anchors, anchor_valid)

    def forward(
        self, batch: DraftBatch, anchors: torch.Tensor | None = None, anchor_valid: torch.Tensor | None = None
    ) -> DraftOutput:
        out = self.training_blocks(batch, anchors, anchor_valid)
        sel = out.valid.nonzero(as_tuple=True)  # only supervised slots reach the [n, V] LM head
        w = self.slot_weights(out.valid)[sel]  # [n]
        # CE and (for the acceptance metric) TV against the target, chunked over rows: no [n, V] tensor is kept
        res = self.vocab_loss(
            [(out.hidden[sel], self.target.lm_head.weight)],
            self.target_rows(batch, out, sel),
            VocabLossTerms(ce=w / w.sum().clamp_min(1e-6)),  # = masked_mean(ce, w)
            labels=out.labels[sel],
            bias=getattr(self.target.lm_head, "bias", None),
        )
        loss = res.loss
        with torch.no_grad():
            acc = torch.zeros(out.valid.shape, device=loss.device)
            acc[sel] = 1.0 - res.tv
            pacc = position_acceptance(acc, out.valid)
        metrics = {
            "loss": float(loss.detach()),
            "ce": float(loss.detach()),
            "anchors": float(out.anchor_valid.sum()),
        }
        return DraftOutput(loss=loss, metrics=metrics, position_acceptance=pacc)

    # ---- export / inference -----------------------------------------------------------------------

    def draft_config(self) -> dict[str, Any]:
        cfg = self.common_config()
        cfg.update(
            {
                "architectures": ["DFlashDraftModel"],
                "model_type": "qwen3",
                "num_hidden_layers": self.num_layers,
                "block_size": self.block_size,
                "mask_token_id": self.mask_token_id,
                "num_target_layers": int(getattr(self.target, "num_layers", 0)),
                "dflash_config": {
                    "target_layer_ids": self.target_layer_ids,
                    "mask_token_id": self.mask_token_id,
                    "block_size": self.block_size,
                },
                "deepspec": {
                    **self.deepspec_section(),
                    "mask_token_id": self.mask_token_id,
                    "slot_convention": self.slot_convention,
                },
            }
        )
        return cfg

    def as_drafter(self, target: TargetModel | None = None) -> DFlashDrafter:
        if target is not None:
            self.check_same_target(target)
        return DFlashDrafter(self)


# --------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------


class DFlashDrafter:
    """Batch-1 block drafter: context keys/values cached per layer, one forward per proposal block."""

    def __init__(self, model: DFlashDraft):
        self.model = model
        self.cache = KVCache(model.num_layers)

    def reset(self) -> None:
        self.cache.reset()

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        m = self.model
        n = features.shape[0]
        if n == 0:
            return
        if tokens.numel() != n:
            raise ValueError(f"extend: {tokens.numel()} tokens but {n} feature rows")
        dev = m.param_device
        ctx = m.context(features.to(dev))[None]  # [1, n, H]
        rope = m.rotary(torch.arange(self.cache.length, self.cache.length + n, device=dev))
        for i, layer in enumerate(m.layers):
            self.cache.append(i, *layer.self_attn.project_kv(ctx, *rope))
        self.cache.commit(n)

    @torch.no_grad()
    def block_hidden(self, anchor: int) -> torch.Tensor:
        """Final normed hidden states [P, H] of the predicting slots of the block [anchor, MASK...]."""
        m = self.model
        dev = m.param_device
        g = m.block_size
        ids = torch.full((1, g), m.mask_token_id, dtype=torch.long, device=dev)
        ids[0, 0] = int(anchor)
        h = m.embed(ids)
        start = self.cache.length  # the anchor's position: context holds every position before it
        rope = m.rotary(torch.arange(start, start + g, device=dev))
        for i, layer in enumerate(m.layers):
            h = layer(h, rope, self.cache.get(i), None)
        return m.norm(h)[0, m.first_predicting_slot :]

    def block_logits(self, anchor: int) -> torch.Tensor:
        """Logits [P, V] of the predictions (row i predicts the token i+1 after the anchor)."""
        return self.model.target_lm_head(self.block_hidden(anchor)).float()

    def propose(
        self, anchor: int, num_proposals: int, temperature: float, generator: torch.Generator | None = None
    ) -> Proposal:
        g = min(int(num_proposals), self.model.proposals_per_block)
        logits = self.block_logits(anchor)[:g]
        tokens, probs = sample_from_logits(logits, temperature, generator)
        return Proposal(tokens=tokens.cpu(), probs=probs)


# re-exported for tests and benchmarks
__all__ = [
    "DFlashDraft",
    "DFlashDrafter",
    "block_flex_mask",
    "build_block_mask",
    "default_mask_token_id",
    "sample_anchors",
]
