"""Shared layers match the HF reference implementations of the target families."""

from __future__ import annotations

import torch

from deepspec.models.layers import DraftDims, KVCache, RMSNorm, RotaryEmbedding, apply_rope, sdpa

from .draft_helpers import make_target


def test_dims_and_rope_follow_the_target(target):
    dims = DraftDims.from_config(target.config)
    assert dims.hidden_size == target.hidden_size and dims.vocab_size == target.vocab_size
    assert dims.num_kv_heads == 2 and dims.head_dim == 16
    rope = RotaryEmbedding(dims.head_dim, dims.rope_parameters, target.config)
    hf_rope = target.base.rotary_emb
    pos = torch.arange(11)[None]
    cos_ref, sin_ref = hf_rope(torch.zeros(1, 11, dims.hidden_size), pos)
    cos, sin = rope(pos)
    torch.testing.assert_close(cos, cos_ref)
    torch.testing.assert_close(sin, sin_ref)


def test_llama3_rope_scaling_uses_the_targets_formula():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    dims = DraftDims.from_config(cfg)
    assert dims.rope_parameters["rope_type"] == "llama3"
    ours = RotaryEmbedding(dims.head_dim, dims.rope_parameters, cfg)
    ref = LlamaRotaryEmbedding(cfg)
    pos = torch.arange(40)[None]
    torch.testing.assert_close(ours(pos)[0], ref(torch.zeros(1, 40, 64), pos)[0])


def test_rmsnorm_matches_hf():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(3, 5, 32)
    ours, ref = RMSNorm(32, 1e-5), LlamaRMSNorm(32, 1e-5)
    with torch.no_grad():
        ours.weight.uniform_()
        ref.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), ref(x))


def test_sdpa_gqa_matches_explicit_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.4
    mask[..., 0] = True
    out = sdpa(q, k, v, mask=mask)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ kk.transpose(-1, -2) / 8**0.5).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ vv, rtol=1e-5, atol=1e-5)
    cos, sin = torch.ones(5, 8), torch.zeros(5, 8)
    assert torch.equal(apply_rope(q, cos, sin), q)


def test_kv_cache_grows_and_keeps_entries():
    cache = KVCache(2)
    chunks = [torch.randn(1, 2, n, 4) for n in (3, 70, 1)]
    for c in chunks:
        for layer in range(2):
            cache.append(layer, c, -c)
        cache.commit(c.shape[2])
    k, v = cache.get(1)
    assert k.shape == (1, 2, 74, 4)
    assert torch.equal(k, torch.cat(chunks, 2)) and torch.equal(v, -torch.cat(chunks, 2))
    cache.reset()
    assert cache.get(0) is None and cache.length == 0


def test_make_target_is_deterministic():
    a, b = make_target("qwen3"), make_target("qwen3")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=False))
