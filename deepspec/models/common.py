"""Shared pieces of the draft models: the training batch / output types, layers and the draft base class.

Layers follow the Llama / Qwen3 conventions (RMSNorm in fp32, rotate-half RoPE, SwiGLU MLP, grouped-query
attention) so that the weights map one-to-one onto the SGLang / vLLM draft architectures at export time.
Every dimension is read from the *target* config (:class:`DraftDims`), so drafts are target-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

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
    """

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] 1 = real token (right padding)
    loss_mask: torch.Tensor  # [B, T] 1 = assistant token whose prediction is supervised
    features: torch.Tensor  # [B, T, k*H] target layer outputs at each position
    target_last_hidden: torch.Tensor  # [B, T, H] target final normed hidden (lm_head input)

    def to(self, device: torch.device | str) -> DraftBatch:
        return DraftBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def supervised(self) -> torch.Tensor:
        """[B, T] bool: token t is a real, supervised assistant token."""
        return self.loss_mask.bool() & self.attention_mask.bool()


@dataclass
class DraftOutput:
    loss: torch.Tensor  # scalar
    metrics: dict[str, float] = field(default_factory=dict)  # per-term losses etc.
    position_acceptance: torch.Tensor | None = None  # [g] mean 1 - TV(p_draft_k, p_target_k) per position


# --------------------------------------------------------------------------------------------------
# Dimensions read from the target config
# --------------------------------------------------------------------------------------------------


def text_config(config: Any) -> Any:
    """The text sub-config of multimodal configs (Gemma3...), or the config itself."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


@dataclass
class DraftDims:
    """Draft layer sizes, copied from the target so that the draft matches its feature width."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    vocab_size: int
    max_position_embeddings: int
    rope_parameters: dict[str, Any]

    @classmethod
    def from_config(cls, config: Any) -> DraftDims:
        c = text_config(config)
        hidden = int(c.hidden_size)
        heads = int(c.num_attention_heads)
        kv = int(getattr(c, "num_key_value_heads", None) or heads)
        head_dim = getattr(c, "head_dim", None) or hidden // heads
        inter = getattr(c, "intermediate_size", None) or 4 * hidden
        if isinstance(inter, (list, tuple)):  # some configs list per-layer sizes
            inter = inter[0]
        return cls(
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=int(head_dim),
            intermediate_size=int(inter),
            rms_norm_eps=float(getattr(c, "rms_norm_eps", None) or 1e-6),
            vocab_size=int(c.vocab_size),
            max_position_embeddings=int(getattr(c, "max_position_embeddings", None) or 32768),
            rope_parameters=rope_parameters(c),
        )


def rope_parameters(config: Any) -> dict[str, Any]:
    """The target's RoPE parameters as a plain dict with at least ``rope_type`` and ``rope_theta``.

    Handles transformers 5 (``config.rope_parameters``, possibly per layer type) and older configs
    (``rope_theta`` + ``rope_scaling``).
    """
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # per layer type (Gemma3: full_attention / sliding_attention): drafts use full attention
        params = params.get("full_attention") or next(iter(params.values()))
    out: dict[str, Any] = dict(params) if isinstance(params, dict) else {}
    if not out:
        scaling = getattr(config, "rope_scaling", None)
        out = dict(scaling) if isinstance(scaling, dict) else {}
        if "type" in out and "rope_type" not in out:
            out["rope_type"] = out.pop("type")
    out.setdefault("rope_type", "default")
    if "rope_theta" not in out:
        out["rope_theta"] = float(getattr(config, "rope_theta", None) or 10000.0)
    return out


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Llama-style RMSNorm (computed in fp32; the output keeps the input dtype, so that under autocast
    normalised queries/keys stay in the same dtype as the values)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(dtype)


class RotaryEmbedding(nn.Module):
    """RoPE with the target's parameters; ``forward(positions)`` gives (cos, sin) [..., head_dim] in fp32."""

    def __init__(self, head_dim: int, params: dict[str, Any], config: Any = None):
        super().__init__()
        rope_type = params.get("rope_type", "default")
        if rope_type == "default" or config is None:
            theta = float(params["rope_theta"])
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
            scaling = 1.0
        else:  # llama3 / yarn / linear ... : the target's own formula (static, no dynamic growth)
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if rope_type not in ROPE_INIT_FUNCTIONS:
                raise ValueError(f"unsupported rope_type {rope_type!r} in the target config")
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](text_config(config), torch.device("cpu"))
            inv_freq = inv_freq.float()[: head_dim // 2]
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = float(scaling)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)  # [..., d/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [..., d]
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, d]; cos/sin: [B, T, d] or [T, d] (fp32). Returns x's dtype."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, d]
    out = x.float() * cos + _rotate_half(x.float()) * sin
    return out.to(x.dtype)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, kv_heads, T, d] -> [B, kv_heads * groups, T, d] (GQA)."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention with GQA.

    q: [B, H, Tq, d]; k, v: [B, Hkv, Tk, d]; mask: bool [B or 1, 1, Tq, Tk] (True = attend) or None.
    Every query row must have at least one allowed key (callers guarantee it), so no NaN appears.
    Uses torch SDPA (flash / memory-efficient kernels on CUDA, the fused CPU kernel otherwise).
    """
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError("attention mask must be boolean (True = attend)")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)


class MLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Grouped-query attention projections (``q_proj``/``k_proj``/``v_proj``/``o_proj``, Llama names).

    ``input_size`` may differ from the hidden size (Eagle3's 2H-wide input). ``qk_norm`` adds per-head
    RMSNorms ``q_norm``/``k_norm`` (Qwen3 / DFlash). The module only projects; the attention pattern
    (causal, TTT, block masks) belongs to each draft model.
    """

    def __init__(self, dims: DraftDims, input_size: int | None = None, qk_norm: bool = False):
        super().__init__()
        d_in = input_size or dims.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = dims.num_heads, dims.num_kv_heads, dims.head_dim
        self.q_proj = nn.Linear(d_in, dims.num_heads * dims.head_dim, bias=False)
        self.k_proj = nn.Linear(d_in, dims.num_kv_heads * dims.head_dim, bias=False)
        self.v_proj = nn.Linear(d_in, dims.num_kv_heads * dims.head_dim, bias=False)
        self.o_proj = nn.Linear(dims.num_heads * dims.head_dim, dims.hidden_size, bias=False)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(dims.head_dim, dims.rms_norm_eps)
            self.k_norm = RMSNorm(dims.head_dim, dims.rms_norm_eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)  # [B, n, T, d]

    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q_proj(x), self.num_heads)
        if self.qk_norm:
            q = self.q_norm(q)
        return apply_rope(q, cos, sin)

    def project_kv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._heads(self.k_proj(x), self.num_kv_heads)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        if self.qk_norm:
            k = self.k_norm(k)
        return apply_rope(k, cos, sin), v

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """attn: [B, H, T, d] -> [B, T, hidden]."""
        b, _, t, _ = attn.shape
        return self.o_proj(attn.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class KVCache:
    """A growable per-layer key/value store for batch-1 inference ([1, Hkv, T, d] views)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.reset()

    def reset(self) -> None:
        self._k: list[torch.Tensor | None] = [None] * self.num_layers
        self._v: list[torch.Tensor | None] = [None] * self.num_layers
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append [1, Hkv, n, d] entries to ``layer``; call for every layer, then :meth:`commit`."""
        n = k.shape[2]
        buf_k = self._k[layer]
        if buf_k is None or buf_k.shape[2] < self.length + n:
            cap = max(64, 2 * (self.length + n))
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if buf_k is not None and self.length:
                new_k[:, :, : self.length] = buf_k[:, :, : self.length]
                new_v[:, :, : self.length] = self._v[layer][:, :, : self.length]  # type: ignore[index]
            self._k[layer], self._v[layer] = new_k, new_v
        self._k[layer][:, :, self.length : self.length + n] = k  # type: ignore[index]
        self._v[layer][:, :, self.length : self.length + n] = v  # type: ignore[index]

    def commit(self, n: int) -> None:
        self.length += n

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.length == 0 or self._k[layer] is None:
            return None
        return self._k[layer][:, :, : self.length], self._v[layer][:, :, : self.length]  # type: ignore[index]


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

    def as_drafter(self, target: TargetModel | None = None) -> SpeculativeDrafter:  # pragma: no cover
        raise NotImplementedError


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


def sample_from_logits(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V] -> (tokens [n], probs [n, V] fp32). T = 0: argmax with one-hot rows."""
    logits = logits.float()
    if temperature <= 0:
        tokens = logits.argmax(-1)
        probs = F.one_hot(tokens, logits.shape[-1]).float()
        return tokens, probs
    probs = torch.softmax(logits / temperature, dim=-1)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, probs


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
