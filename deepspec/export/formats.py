"""The config.json and tensors written for each serving engine (rules and citations: :mod:`.engines`).

* Eagle3 -> ``LlamaForCausalLMEagle3``: Llama decoder fields, ``draft_vocab_size``, both
  ``eagle_config.eagle_aux_hidden_state_layer_ids`` (0-based "output of layer i", SGLang adds +1 itself)
  and a top-level ``eagle_aux_hidden_state_layer_ids`` shifted by +1 (vLLM's "input of layer i"), always;
  weights ``fc``, ``midlayer.*``, ``norm``, ``lm_head`` [Vd, H], ``d2t`` [Vd] (target - draft id), ``t2d``.
* DFlash -> ``DFlashDraftModel``: ``block_size`` (anchor + mask slots, as the engines mean it),
  ``dflash_config.{target_layer_ids, mask_token_id, block_size}``, ``num_target_layers``; weights ``fc``,
  ``hidden_norm``, ``layers.<i>.*`` (Qwen3 q/k norms), ``norm``; no embedding / LM head.
* DSpark -> ``DSparkDraftModel`` (SGLang) / ``Qwen3DSparkModel`` (vLLM): the DFlash fields plus
  ``markov_rank``, ``markov_head_type``, ``enable_confidence_head``, ``confidence_head_with_markov``;
  weights ``markov_head.markov_w1.weight`` [V, r], ``markov_head.markov_w2.weight`` [V, r],
  ``confidence_head.proj.{weight,bias}`` (fp32, as the engines allocate them).

Every export also records ``deepspec.slot_convention`` (what each block slot was trained to predict), so
:mod:`.engines` can refuse an export whose training convention differs from the engine's.
"""

from __future__ import annotations

import re
from typing import Any

from deepspec.export.engines import (
    ARCHITECTURES,
    ENGINES,
    MARKOV_HEADS,
    ConformanceError,
    expected_tensors,
    feature_layer_ids,
)

# Draft state entries that are not serving weights (recomputed by the engines).
IGNORED_STATE = re.compile(r"(^|\.)(rotary|rotary_emb)\.|inv_freq$")
#: tensors written in fp32 whatever the export dtype (the engines allocate them in fp32)
FP32_TENSORS = re.compile(r"^confidence_head\.")


class ExportError(ConformanceError):
    """A draft cannot be exported for an engine; the message says which engine and why."""


def serving_config(draft_config: dict[str, Any], algorithm: str, engine: str) -> dict[str, Any]:
    """The config.json written for ``engine`` from the draft's own config; refuses heads it cannot serve."""
    if engine not in ENGINES:
        raise ExportError(f"unknown export format {engine!r}; choose sglang or vllm")
    cfg = dict(draft_config)
    ids = feature_layer_ids(cfg)
    cfg["architectures"] = [ARCHITECTURES[engine][algorithm]]
    if algorithm == "eagle3":
        cfg.setdefault("model_type", "llama")
        cfg["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in ids]  # vLLM; SGLang reads eagle_config
        return cfg
    dcfg = dict(cfg.get("dflash_config") or {})
    dcfg.setdefault("target_layer_ids", ids)
    dcfg.setdefault("mask_token_id", cfg.get("mask_token_id"))
    dcfg.setdefault("block_size", cfg.get("block_size"))
    cfg["dflash_config"] = dcfg
    if algorithm == "dspark":
        kind = str(cfg.get("markov_head_type"))
        if kind not in MARKOV_HEADS[engine]:
            why = {
                "rnn": "our rnn head is a GRU, not SGLang's joint_proj RNN head, and vLLM builds the vanilla "
                "head only",
                "none": "SGLang requires a Markov head (markov_rank > 0) and vLLM builds the vanilla head only",
            }.get(kind, "unknown head type")
            raise ExportError(
                f"{engine} cannot serve a DSpark draft with markov_head {kind!r} ({why}); train it with "
                f"draft.markov_head=vanilla"
            )
        cfg["dspark_target_layer_ids"] = ids
    return cfg


def serving_tensors(state: dict[str, Any], cfg: dict[str, Any], algorithm: str) -> dict[str, Any]:
    """The draft's state restricted to serving weights; names must be the engine model's (no renaming)."""
    out = {k: v for k, v in state.items() if not IGNORED_STATE.search(k)}
    want = expected_tensors(cfg, algorithm)
    unexpected, missing = sorted(set(out) - set(want)), sorted(set(want) - set(out))
    if unexpected or missing:
        raise ExportError(
            f"draft weights do not map onto {cfg['architectures'][0]}: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    return out
