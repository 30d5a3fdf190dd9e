"""Target wrapper: hooked features equal a plain forward's hidden states; frozen; default layer ids."""

from __future__ import annotations

import pytest
import torch

from deepspec.target_model.model import TargetModel, default_layer_ids
from deepspec.testing.tiny import tiny_llama, tiny_qwen3, tiny_target


@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen3], ids=["llama", "qwen3"])
def test_capture_matches_output_hidden_states(builder):
    model = builder(layers=4)
    target = TargetModel.from_model(model, [0, 2, 3])
    ids = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    out = target.capture(ids, attention_mask=mask, return_logits=True)
    ref = model(ids, attention_mask=mask, output_hidden_states=True)
    hs = ref.hidden_states  # [embeddings, layer 0 out, ..., final normed]
    # output_hidden_states[i+1] is the output of layer i, except the last entry (already normed)
    torch.testing.assert_close(out.features[..., :128], torch.cat([hs[1], hs[3]], dim=-1), rtol=0, atol=0)
    assert out.features.shape == (2, 11, 3 * 64)
    # layer 3 is the last one: its captured (pre-norm) output, normed, is the final hidden state
    torch.testing.assert_close(target.base.norm(out.features[..., 128:]), hs[-1], rtol=0, atol=0)
    # HF's last hidden_states entry is the final-norm output (lm_head input)
    torch.testing.assert_close(out.last_hidden, hs[-1], rtol=0, atol=0)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(target.compute_logits(out.last_hidden), ref.logits, rtol=0, atol=0)
    assert target.capture(ids).logits is None  # logits only when asked


def test_frozen_and_fp32_on_cpu():
    target = tiny_target("qwen3", layer_ids=[1, 2])
    assert all(not p.requires_grad for p in target.parameters())
    assert target.dtype == torch.float32
    target.train()
    assert not target.model.training
    assert target.embed_tokens is target.model.get_input_embeddings()
    assert target.lm_head is target.model.get_output_embeddings()
    assert (target.hidden_size, target.vocab_size, target.num_layers) == (64, 128, 4)


def test_cache_for_generation_and_capture_no_grad():
    target = tiny_target("llama", layer_ids=[1])
    ids = torch.randint(3, 100, (1, 6))
    out = target.capture(ids, use_cache=True)
    assert out.past_key_values is not None and not out.features.requires_grad
    nxt = target.capture(ids[:, -1:] * 0 + 5, past_key_values=out.past_key_values, use_cache=True)
    assert nxt.features.shape == (1, 1, 64)


def test_default_layer_ids():
    assert default_layer_ids(36, "eagle3") == [1, 17, 32]  # SGLang [1, L/2-1, L-4]
    assert default_layer_ids(36, "dflash") == [1, 9, 17, 25, 33]  # the reference recipe
    assert default_layer_ids(36, "dspark") == [1, 9, 17, 25, 33]
    assert default_layer_ids(36, "eagle3", k=5) == [1, 9, 17, 25, 33]
    for n in (4, 8, 24, 28, 30, 40):
        for algo in ("eagle3", "dflash"):
            ids = default_layer_ids(n, algo)
            assert max(ids) < n - 1, (n, algo, ids)  # never the last layer
            assert min(ids) >= 0
    with pytest.raises(ValueError, match="algorithm"):
        default_layer_ids(10, "medusa")


def test_bad_layer_ids_are_refused():
    with pytest.raises(ValueError, match="target_layer_ids"):
        tiny_target("llama", layer_ids=[0, 4])
