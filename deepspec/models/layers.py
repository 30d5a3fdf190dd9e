"""Draft layers in the Llama / Qwen3 conventions, sized from the target config.

RMSNorm in fp32, rotate-half RoPE, SwiGLU MLP and grouped-query attention, so that the weights map
one-to-one onto the SGLang / vLLM draft architectures at export time. Every dimension is read from the
*target* config (:class:`DraftDims`), so drafts are target-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
