"""The frozen target LLM: selected-layer feature capture, final normed hidden state and LM head.

The wrapper works for any HF causal LM whose base model holds a list of decoder layers (Llama,
Qwen2/Qwen3, Mistral, Gemma...). Features are the outputs of selected decoder layers ("output of
layer i", 0-based, before the final norm), captured with forward hooks so that no other layer's
hidden state is kept. Logits are computed only when asked, so the draft losses can restrict the
``[T, V]`` projection to supervised positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepspec.devices import pick_device

# --------------------------------------------------------------------------------------------------
# Layer choices
# --------------------------------------------------------------------------------------------------


def _evenly_spaced(num_layers: int, k: int) -> list[int]:
    """``k`` layers from 1 to L-3 inclusive (the DFlash reference: [1, 9, 17, 25, 33] for L=36, k=5)."""
    start, end = 1, num_layers - 3
    if end - start < k - 1:  # shallow (test) targets: spread over [0, L-2] instead
        start, end = 0, num_layers - 2
    if k == 1:
        return [start]
    span = end - start
    return [round(start + i * span / (k - 1)) for i in range(k)]


def default_layer_ids(num_layers: int, algorithm: str, k: int | None = None) -> list[int]:
    """Default target layers whose outputs are the draft's features.

    Eagle3, k=3 (default): ``[1, L//2 - 1, L - 4]`` (SGLang's choice); Eagle3 with k=5 and
    DFlash/DSpark (k=5 default): evenly spaced between layer 1 and L-3, so never the last layer.
    Targets shallower than 8 layers, where the SGLang formula collides, fall back to evenly spaced
    (over [0, L-2] when [1, L-3] is too narrow). Always ascending without repeats (fewer than k ids on
    very shallow targets): the serving engines capture each layer once, in ascending order.
    """
    if num_layers < 2:
        raise ValueError(f"a target needs at least 2 decoder layers for feature capture, got {num_layers}")
    if algorithm == "eagle3":
        k = 3 if k is None else k
        if k == 3 and num_layers >= 8:
            return [1, num_layers // 2 - 1, num_layers - 4]
    elif algorithm in ("dflash", "dspark"):
        k = 5 if k is None else k
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected eagle3, dflash or dspark")
    ids = _evenly_spaced(num_layers, k)
    return sorted({min(i, num_layers - 2) for i in ids})


# --------------------------------------------------------------------------------------------------
# Locating the parts of an arbitrary HF causal LM
# --------------------------------------------------------------------------------------------------


def find_base_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``model.model`` for Llama/Qwen/Mistral/Gemma, or ``base_model``)."""
    for cand in (getattr(model, "model", None), getattr(model, "base_model", None)):
        if cand is not None and isinstance(getattr(cand, "layers", None), nn.ModuleList):
            return cand
    # Multimodal wrappers (Gemma3ForConditionalGeneration...) nest a language model one level deeper.
    for name in ("language_model", "text_model"):
        inner = getattr(getattr(model, "model", model), name, None)
        if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
            return inner
    raise ValueError(
        f"cannot find the decoder layer list of {type(model).__name__}: expected model.model.layers "
        "or base_model.layers (an HF causal LM with a decoder stack)"
    )


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


# --------------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------------


@dataclass
class TargetOutput:
    features: torch.Tensor  # [B, T, k*H] concatenated outputs of the selected decoder layers (pre final norm)
    last_hidden: torch.Tensor  # [B, T, H] final hidden state AFTER the final norm (lm_head input)
    past_key_values: Any = None  # HF cache when use_cache=True
    logits: torch.Tensor | None = None  # [B, T, V] only when asked


class TargetModel(nn.Module):
    """Frozen HF causal LM with selected-layer capture (bf16 on GPU, fp32 on CPU, no gradients)."""

    def __init__(self, model: nn.Module, layer_ids: list[int]):
        super().__init__()
        self.model = model
        self.config = model.config
        text_config = _text_config(model.config)
        self.base = find_base_model(model)
        self.layers: nn.ModuleList = self.base.layers
        self.num_layers = len(self.layers)
        self.hidden_size = int(text_config.hidden_size)
        self.vocab_size = int(text_config.vocab_size)
        bad = [i for i in layer_ids if not 0 <= i < self.num_layers]
        if not layer_ids or bad:
            raise ValueError(
                f"target_layer_ids {layer_ids} invalid for a {self.num_layers}-layer target "
                f"(0-based, each in [0, {self.num_layers - 1}])"
            )
        self.layer_ids = list(layer_ids)
        self.embed_tokens: nn.Embedding = model.get_input_embeddings()
        self.lm_head: nn.Linear = model.get_output_embeddings()
        self.final_logit_softcapping: float | None = getattr(text_config, "final_logit_softcapping", None)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self._captured: dict[int, torch.Tensor] = {}
        for i in sorted(set(self.layer_ids)):
            self.layers[i].register_forward_hook(self._make_hook(i))

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        spec: str,
        layer_ids: list[int] | None,
        algorithm: str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
    ) -> TargetModel:
        """Load ``spec`` (HF dir, .gguf, 'smollm2' or hub id) frozen; dtype 'auto' = bf16 on GPU, fp32 on CPU."""
        from transformers import AutoModelForCausalLM

        from deepspec.target_model.files import resolve_model_path

        device = pick_device(device)
        if dtype is None or dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        path = resolve_model_path(spec)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        model.to(device)
        if layer_ids is None:
            layer_ids = default_layer_ids(len(find_base_model(model).layers), algorithm)
        target = cls(model, layer_ids)
        target.name_or_path = path
        return target

    @classmethod
    def from_model(cls, model: nn.Module, layer_ids: list[int]) -> TargetModel:
        """Wrap an already built model (tests: tiny random models)."""
        return cls(model, layer_ids)

    # ---- capture --------------------------------------------------------------------------------

    def _make_hook(self, index: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            self._captured[index] = hidden

        return hook

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def train(self, mode: bool = True) -> TargetModel:  # the target never leaves eval mode
        return super().train(False)

    @torch.no_grad()
    def capture(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        return_logits: bool = False,
        position_ids: torch.Tensor | None = None,
    ) -> TargetOutput:
        """Run the target once; return selected layer outputs, the final normed state and optional logits."""
        self._captured.clear()
        try:
            out = self.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_ids=position_ids,
            )
            features = torch.cat([self._captured[i] for i in self.layer_ids], dim=-1)  # [B, T, k*H]
        finally:
            self._captured.clear()
        last_hidden = out.last_hidden_state  # [B, T, H], after the final norm
        logits = self.compute_logits(last_hidden) if return_logits else None
        return TargetOutput(
            features=features,
            last_hidden=last_hidden,
            past_key_values=out.past_key_values if use_cache else None,
            logits=logits,
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Target logits from already-normed hidden states (applies Gemma-style soft-capping if any)."""
        logits = self.lm_head(hidden)
        if self.final_logit_softcapping:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, *args: Any, **kwargs: Any) -> TargetOutput:
        return self.capture(*args, **kwargs)
