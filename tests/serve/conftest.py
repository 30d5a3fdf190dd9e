"""Fixtures: a tiny random Llama saved with SmolLM2's tokenizer and a Qwen3-style chat template.

The Qwen3-style template (tests/data/fixtures/qwen3_like.jinja) reacts to ``enable_thinking``, so a
test can see ``chat_template_kwargs`` reach the template through the prompt token count.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEMPLATE = Path(__file__).parents[1] / "data" / "fixtures" / "qwen3_like.jinja"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> str:
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = copy.deepcopy(smollm2_tokenizer)  # the template below must not leak into the shared one
    tok.chat_template = TEMPLATE.read_text()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a peaked-enough distribution that sampling settings visibly matter
        model.model.embed_tokens.weight.mul_(20.0)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def engine(tiny_model_dir):
    from deepspec.serve.engine import GenerationEngine

    eng = GenerationEngine(tiny_model_dir, device="cpu", max_batch_size=8, batch_wait_ms=1.0)
    yield eng
    eng.stop()
