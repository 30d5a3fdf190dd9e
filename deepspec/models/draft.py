"""The draft base class and the training batch / output types (trainer <-> draft)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from deepspec.models.layers import DraftDims
from deepspec.models.vocab_loss import VocabLossOutput, VocabLossTerms, vocab_loss

if TYPE_CHECKING:
    from deepspec.config import DraftModelConfig
    from deepspec.models.base import SpeculativeDrafter
    from deepspec.target_model.model import TargetModel

# --------------------------------------------------------------------------------------------------
# Training batch (trainer -> draft) and output (draft -> trainer)
# --------------------------------------------------------------------------------------------------


@dataclass
class DraftBatch:
    """One micro-batch of right-padded sequences with their target features.

    Convention: ``loss_mask[t] = 1`` means token ``t`` is an assistant token; a draft predicting token ``t``
    from context ``< t`` is supervised iff ``loss_mask[t] = 1``.

    Packed rows (``training.packing``): ``position_ids`` gives each token's position inside its own
    sequence; it restarts at 0 where the next sequence of the row begins (the row's padding tail is one
    more segment of its own, with ``attention_mask`` 0). Without it every row holds one sequence from
    position 0. Drafts keep attention, shifted targets and anchors inside each sequence (:meth:`segments`).
    """

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] 1 = real token (right padding)
    loss_mask: torch.Tensor  # [B, T] 1 = assistant token whose prediction is supervised
    features: torch.Tensor  # [B, T, k*H] target layer outputs at each position
    target_last_hidden: torch.Tensor  # [B, T, H] target final normed hidden (lm_head input)
    position_ids: torch.Tensor | None = None  # [B, T] long, packed rows only (see the class docstring)

    def to(self, device: torch.device | str) -> DraftBatch:
        return DraftBatch(
            *(None if (v := getattr(self, f)) is None else v.to(device) for f in self.__dataclass_fields__)
        )

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    def supervised(self) -> torch.Tensor:
        """[B, T] bool: token t is a real, supervised assistant token."""
        return self.loss_mask.bool() & self.attention_mask.bool()

    def positions(self) -> torch.Tensor:
        """[B, T] long: each token's position inside its own sequence."""
        if self.position_ids is not None:
            return self.position_ids
        b, t = self.input_ids.shape
        return torch.arange(t, device=self.input_ids.device).expand(b, t)

    def segments(self) -> torch.Tensor:
        """[B, T] long: which sequence of its row each token belongs to (0, 1, ... from the left)."""
        return segment_ids(self.positions())


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] positions restarting at 0 for each packed sequence -> [B, T] sequence index in the row."""
    return (position_ids == 0).long().cumsum(-1) - 1


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, T, T] (True = may attend): causal inside each packed sequence, nothing across."""
    seg = segment_ids(position_ids)
    t = seg.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
    return (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]


@dataclass
class DraftOutput:
    loss: torch.Tensor  # scalar
    metrics: dict[str, float] = field(default_factory=dict)  # per-term losses etc.
    position_acceptance: torch.Tensor | None = None  # [g] mean 1 - TV(p_draft_k, p_target_k) per position


# --------------------------------------------------------------------------------------------------
# Draft base class
# --------------------------------------------------------------------------------------------------


class DraftModel(nn.Module):
    """Common behaviour of Eagle3 / DFlash / DSpark drafts.

    The target (and so its embedding and LM head) is held in a plain tuple: it is not a registered
    submodule, so its weights are neither trainable parameters of the draft nor part of its state dict,
    and ``draft.to(...)`` / DDP / FSDP never touch them.
    """

    algorithm: str = ""
    #: bytes of one [rows, V] fp32 tensor of the chunked LM-head loss (see :func:`vocab_loss`); set per
    #: instance to trade speed for memory (a larger chunk means fewer, larger matmuls)
    loss_chunk_bytes: int = 256 * 2**20

    def __init__(self, cfg: DraftModelConfig, target: TargetModel):
        super().__init__()
        self.cfg = cfg.model_copy(deep=True)
        self._target_ref = (target,)
        self.dims = DraftDims.from_config(target.config)
        if self.dims.hidden_size != target.hidden_size:
            raise ValueError(
                f"target hidden size mismatch: config says {self.dims.hidden_size}, model has {target.hidden_size}"
            )
        if cfg.target_layer_ids is not None and list(cfg.target_layer_ids) != list(target.layer_ids):
            raise ValueError(
                f"draft.target_layer_ids {cfg.target_layer_ids} differ from the target's capture layers "
                f"{target.layer_ids}: build the target with the same layer ids"
            )
        self.target_layer_ids = list(target.layer_ids)
        self.num_features = len(self.target_layer_ids)

    # ---- frozen target parts --------------------------------------------------------------------

    @property
    def target(self) -> TargetModel:
        return self._target_ref[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Frozen target embedding, in the draft's dtype."""
        with torch.no_grad():
            return self.target.embed_tokens(input_ids).to(self.param_dtype)

    def target_lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Frozen target LM head applied to draft hidden states (gradients flow to ``hidden`` only)."""
        weight = self.target.lm_head.weight
        bias = getattr(self.target.lm_head, "bias", None)
        return F.linear(hidden.to(weight.dtype), weight, bias)

    @torch.no_grad()
    def target_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Target logits (fp32) from the target's final normed hidden states."""
        return self.target.compute_logits(last_hidden.to(self.target.lm_head.weight.dtype)).float()

    def vocab_loss(
        self,
        heads: Sequence[tuple[torch.Tensor, torch.Tensor]],
        target_hidden: torch.Tensor,
        coef: VocabLossTerms,
        labels: torch.Tensor | None = None,
        target_ids: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> VocabLossOutput:
        """:func:`vocab_loss` against this draft's frozen target, chunked by :attr:`loss_chunk_bytes`."""
        vocab = max(heads[0][1].shape[0], self.dims.vocab_size)  # the widest [rows, V] tensor
        return vocab_loss(
            heads,
            target_hidden,
            self.target_logits,
            coef,
            labels=labels,
            target_ids=target_ids,
            bias=bias,
            chunk_rows=max(1, int(self.loss_chunk_bytes) // (4 * vocab)),
        )

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def param_device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- checkpoints ----------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The draft's own weights (and buffers such as d2t/t2d): what checkpoints and exports save."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def common_config(self) -> dict[str, Any]:
        d = self.dims
        return {
            "hidden_size": d.hidden_size,
            "intermediate_size": d.intermediate_size,
            "num_attention_heads": d.num_heads,
            "num_key_value_heads": d.num_kv_heads,
            "head_dim": d.head_dim,
            "rms_norm_eps": d.rms_norm_eps,
            "vocab_size": d.vocab_size,
            "max_position_embeddings": d.max_position_embeddings,
            "rope_theta": d.rope_parameters.get("rope_theta"),
            "rope_parameters": d.rope_parameters,
            "hidden_act": "silu",
            "attention_bias": False,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }

    def deepspec_section(self) -> dict[str, Any]:
        """What :func:`deepspec.models.load_draft` needs to rebuild this draft."""
        return {
            "algorithm": self.algorithm,
            "draft": self.cfg.model_dump(mode="json"),
            "target_layer_ids": self.target_layer_ids,
            "target_hidden_size": self.dims.hidden_size,
            "target_vocab_size": self.dims.vocab_size,
            "target_num_layers": int(getattr(self.target, "num_layers", 0)),
        }

    def draft_config(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def check_same_target(self, target: TargetModel) -> None:
        """Refuse a target whose captured layers or width differ from the one this draft was built for."""
        if target is self.target:
            return
        if list(target.layer_ids) != self.target_layer_ids or target.hidden_size != self.dims.hidden_size:
            raise ValueError(
                f"as_drafter: target captures layers {target.layer_ids} (H={target.hidden_size}) but the draft "
                f"was built for {self.target_layer_ids} (H={self.dims.hidden_size})"
            )

    def as_drafter(self, target: TargetModel | None = None) -> SpeculativeDrafter:  # pragma: no cover
        raise NotImplementedError
