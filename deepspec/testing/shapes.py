"""Randomly initialised targets of real model shapes, for benchmarks (throughput does not depend on
the weights, so no checkpoint is needed on the GPU machine).

One table serves every script in ``bench/``, so "the Qwen3-4B shape" means the same model everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    # CPU smoke runs
    "tiny": dict(arch="qwen3", vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=128, tie_word_embeddings=False),
    # CPU memory profiling with a realistic vocabulary/hidden ratio
    "small": dict(arch="qwen3", vocab_size=32000, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, intermediate_size=768, tie_word_embeddings=False),
    # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2": dict(arch="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True, rope_theta=100000.0,
                    rms_norm_eps=1e-5),
    # Qwen/Qwen3-4B (DESIGN.md's reference set-up)
    "qwen3-4b": dict(arch="qwen3", vocab_size=151936, hidden_size=2560, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=9728,
                     tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
}  # fmt: skip
ALIASES = {"smollm2-135m": "smollm2"}


def random_target(
    shape: str, device: torch.device, algorithm: str, dtype: torch.dtype | None = None, seed: int = 0
):
    """A frozen :class:`~deepspec.target_model.model.TargetModel` of ``shape`` with random weights (SDPA attention),
    bf16 on CUDA and fp32 on CPU unless ``dtype`` is given; layers chosen as for ``algorithm``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from deepspec.target_model.model import TargetModel, default_layer_ids

    spec = dict(SHAPES[ALIASES.get(shape, shape)])
    arch = spec.pop("arch")
    cfg_cls, model_cls = (
        (Qwen3Config, Qwen3ForCausalLM) if arch == "qwen3" else (LlamaConfig, LlamaForCausalLM)
    )
    config = cfg_cls(**spec, max_position_embeddings=8192, attn_implementation="sdpa")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls(config).to(dtype).eval()
    return TargetModel.from_model(model, default_layer_ids(config.num_hidden_layers, algorithm))
