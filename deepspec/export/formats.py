"""Serving-engine checkpoint formats (SGLang / vLLM) and the spec every export is validated against.

* Eagle3 -> ``LlamaForCausalLMEagle3``: Llama decoder fields, ``draft_vocab_size``,
  ``eagle_config.eagle_aux_hidden_state_layer_ids`` (0-based "output of layer i", SGLang's convention);
  weights ``fc``, ``midlayer.*``, ``norm``, ``lm_head`` [Vd, H], ``d2t`` [Vd] (offset target - draft id),
  ``t2d`` [V] (bool); no ``embed_tokens``. vLLM reads a top-level ``eagle_aux_hidden_state_layer_ids``
  in *its* convention, where aux state i is the input of layer i, i.e. the output of layer i - 1: the
  ids are written shifted by +1.
* DFlash -> ``DFlashDraftModel``: ``block_size``, ``dflash_config.{target_layer_ids, mask_token_id}``,
  ``num_target_layers``; weights ``fc``, ``hidden_norm``, ``layers.<i>.*`` (Qwen3-style q/k norms), ``norm``;
  no embedding / LM head (the target's are used). vLLM shifts ``dflash_config.target_layer_ids`` by +1
  itself, so the same file serves both.
* DSpark: the DFlash fields and tensors plus ``markov_rank``, ``markov_head_type``,
  ``use_confidence_head`` and the ``markov_head.*`` / ``confidence.*`` tensors; slot k predicts anchor+k+1.

The expected spec is derived from the *config* (dimensions), independently of the weights, so a
missing, extra, misnamed or mis-shaped tensor is caught when the export is reloaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

Format = str  # "sglang" | "vllm"
# Draft state entries that are not serving weights (recomputed by the engines).
IGNORED_STATE = re.compile(r"(^|\.)(rotary|rotary_emb)\.|inv_freq$")


class ExportError(ValueError):
    """An export does not match its serving format; the message lists every problem."""


@dataclass
class TensorSpec:
    shape: tuple[int, ...]
    kind: str = "float"  # float | int64 | bool


@dataclass
class ExportSpec:
    architecture: str
    config: dict[str, Any]  # dotted key -> required value
    tensors: dict[str, TensorSpec] = field(default_factory=dict)


def _layer_tensors(prefix: str, c: dict[str, Any], attn_in: int, qk_norm: bool) -> dict[str, TensorSpec]:
    h, nh, nkv, hd, inter = (
        c["hidden_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["head_dim"],
        c["intermediate_size"],
    )
    t = {
        f"{prefix}input_layernorm.weight": TensorSpec((h,)),
        f"{prefix}self_attn.q_proj.weight": TensorSpec((nh * hd, attn_in)),
        f"{prefix}self_attn.k_proj.weight": TensorSpec((nkv * hd, attn_in)),
        f"{prefix}self_attn.v_proj.weight": TensorSpec((nkv * hd, attn_in)),
        f"{prefix}self_attn.o_proj.weight": TensorSpec((h, nh * hd)),
        f"{prefix}post_attention_layernorm.weight": TensorSpec((h,)),
        f"{prefix}mlp.gate_proj.weight": TensorSpec((inter, h)),
        f"{prefix}mlp.up_proj.weight": TensorSpec((inter, h)),
        f"{prefix}mlp.down_proj.weight": TensorSpec((h, inter)),
    }
    if qk_norm:
        t[f"{prefix}self_attn.q_norm.weight"] = TensorSpec((hd,))
        t[f"{prefix}self_attn.k_norm.weight"] = TensorSpec((hd,))
    return t


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def layer_ids_of(cfg: dict[str, Any]) -> list[int]:
    for key in ("eagle_config.eagle_aux_hidden_state_layer_ids", "dflash_config.target_layer_ids"):
        try:
            return list(_get(cfg, key))
        except KeyError:
            continue
    raise ExportError(
        "config has neither eagle_config.eagle_aux_hidden_state_layer_ids nor dflash_config.target_layer_ids"
    )


def expected_spec(cfg: dict[str, Any], algorithm: str, fmt: Format) -> ExportSpec:
    """What a correct export of ``algorithm`` in ``fmt`` must contain, derived from its config dims."""
    try:
        h = int(cfg["hidden_size"])
        vocab = int(cfg["vocab_size"])
        ids = layer_ids_of(cfg)
        k = len(ids)
        if algorithm == "eagle3":
            vd = int(cfg["draft_vocab_size"])
            spec = ExportSpec(
                "LlamaForCausalLMEagle3",
                {
                    "num_hidden_layers": 1,
                    "draft_vocab_size": vd,
                    "eagle_config.eagle_aux_hidden_state_layer_ids": ids,
                },
            )
            spec.tensors = {
                "fc.weight": TensorSpec((h, k * h)),
                "midlayer.hidden_norm.weight": TensorSpec((h,)),
                **_layer_tensors("midlayer.", cfg, 2 * h, qk_norm=False),
                "norm.weight": TensorSpec((h,)),
                "lm_head.weight": TensorSpec((vd, h)),
                "d2t": TensorSpec((vd,), "int64"),
                "t2d": TensorSpec((vocab,), "bool"),
            }
            if fmt == "vllm":
                spec.config["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in ids]
            return spec
        if algorithm not in ("dflash", "dspark"):
            raise ExportError(f"unknown algorithm {algorithm!r}")
        n_layers = int(cfg["num_hidden_layers"])
        arch = "DFlashDraftModel" if algorithm == "dflash" else "DSparkDraftModel"
        spec = ExportSpec(
            arch,
            {
                "block_size": int(cfg["block_size"]),
                "dflash_config.target_layer_ids": ids,
                "dflash_config.mask_token_id": int(_get(cfg, "dflash_config.mask_token_id")),
            },
        )
        spec.tensors = {"fc.weight": TensorSpec((h, k * h)), "hidden_norm.weight": TensorSpec((h,))}
        for i in range(n_layers):
            spec.tensors.update(_layer_tensors(f"layers.{i}.", cfg, h, qk_norm=True))
        spec.tensors["norm.weight"] = TensorSpec((h,))
        if algorithm == "dspark":
            r = int(cfg["markov_rank"])
            kind = str(cfg["markov_head_type"])
            spec.config.update({"markov_rank": r, "markov_head_type": kind, "dspark_target_layer_ids": ids})
            spec.tensors["markov_head.w1.weight"] = TensorSpec((vocab, r))
            if kind != "none":
                spec.tensors["markov_head.w2.weight"] = TensorSpec((vocab, r))
            if kind == "rnn":
                spec.tensors.update(
                    {
                        "markov_head.rnn.weight_ih": TensorSpec((3 * r, r)),
                        "markov_head.rnn.weight_hh": TensorSpec((3 * r, r)),
                        "markov_head.rnn.bias_ih": TensorSpec((3 * r,)),
                        "markov_head.rnn.bias_hh": TensorSpec((3 * r,)),
                    }
                )
            if cfg.get("use_confidence_head"):
                spec.tensors["confidence.weight"] = TensorSpec((1, h + r))
                spec.tensors["confidence.bias"] = TensorSpec((1,))
        return spec
    except KeyError as e:
        raise ExportError(
            f"export config lacks the field {e.args[0]!r} needed for the {algorithm} format"
        ) from None


def serving_config(draft_config: dict[str, Any], algorithm: str, fmt: Format) -> dict[str, Any]:
    """The config.json written for ``fmt`` from the draft's own (SGLang-style) config."""
    cfg = dict(draft_config)
    ids = layer_ids_of(cfg)
    if algorithm == "eagle3":
        cfg["architectures"] = ["LlamaForCausalLMEagle3"]
        cfg.setdefault("model_type", "llama")
        if fmt == "vllm":
            cfg["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in ids]
        else:
            cfg.pop("eagle_aux_hidden_state_layer_ids", None)
    else:
        cfg["architectures"] = ["DFlashDraftModel" if algorithm == "dflash" else "DSparkDraftModel"]
        dcfg = dict(cfg.get("dflash_config") or {})
        dcfg.setdefault("target_layer_ids", ids)
        dcfg.setdefault("mask_token_id", cfg.get("mask_token_id"))
        dcfg.setdefault("block_size", cfg.get("block_size"))
        cfg["dflash_config"] = dcfg
        if algorithm == "dspark":
            cfg["dspark_target_layer_ids"] = ids
    return cfg


def serving_tensors(state: dict[str, Any], spec: ExportSpec) -> dict[str, Any]:
    """The draft's state restricted to serving weights; unknown entries are errors (misnamed tensors)."""
    out = {k: v for k, v in state.items() if not IGNORED_STATE.search(k)}
    unexpected = sorted(set(out) - set(spec.tensors))
    missing = sorted(set(spec.tensors) - set(out))
    if unexpected or missing:
        raise ExportError(
            f"draft weights do not map onto {spec.architecture}: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    return out
