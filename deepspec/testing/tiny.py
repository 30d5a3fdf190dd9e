"""Tiny randomly initialised HF targets for fast, deterministic tests and CPU benchmark smoke runs.

Every builder seeds torch before constructing the model, so the same arguments give bit-identical
weights. Models are returned in float32 and in eval mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from deepspec.target_model.model import TargetModel


def _common(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _build(model_cls, config, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = model_cls(config)
    model.to(torch.float32).eval()
    return model


def tiny_llama(
    vocab: int = 128, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2, seed: int = 0
) -> PreTrainedModel:
    """A random ``LlamaForCausalLM`` (SDPA attention, untied LM head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**_common(vocab, hidden, layers, heads, kv_heads), attn_implementation="sdpa")
    return _build(LlamaForCausalLM, config, seed)


def tiny_qwen3(
    vocab: int = 128, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2, seed: int = 0
) -> PreTrainedModel:
    """A random ``Qwen3ForCausalLM`` (q/k norms, explicit head_dim)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        **_common(vocab, hidden, layers, heads, kv_heads),
        head_dim=hidden // heads,
        attn_implementation="sdpa",
    )
    return _build(Qwen3ForCausalLM, config, seed)


TINY_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    """A character-level fast tokenizer (< 128 ids) with a chat template, for tiny random targets.

    Ids: 0 <pad>, 1 <s>, 2 </s>, 3 <unk>, 4..7 role markers, then newline and printable ASCII.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=TINY_SPECIALS[4:],
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def save_tiny_target(out_dir: str, arch: str = "llama", **kwargs) -> str:
    """Write a tiny random model + :func:`tiny_tokenizer` as an HF directory (a loadable ``target.model``)."""
    builders = {"llama": tiny_llama, "qwen3": tiny_qwen3}
    model = builders[arch](**kwargs)
    model.save_pretrained(out_dir, safe_serialization=True)
    tiny_tokenizer().save_pretrained(out_dir)
    return out_dir


def tiny_target(arch: str = "llama", layer_ids: list[int] | None = None, **kwargs) -> TargetModel:
    """A :class:`~deepspec.target_model.model.TargetModel` around a tiny random model (``arch``: llama | qwen3).

    ``layer_ids`` defaults to the Eagle3 choice for the model depth. Extra keyword arguments go to the
    model builder (vocab, hidden, layers, heads, kv_heads, seed).
    """
    from deepspec.target_model.model import TargetModel, default_layer_ids

    builders = {"llama": tiny_llama, "qwen3": tiny_qwen3}
    if arch not in builders:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {sorted(builders)}")
    model = builders[arch](**kwargs)
    if layer_ids is None:
        layer_ids = default_layer_ids(model.config.num_hidden_layers, "eagle3")
    return TargetModel.from_model(model, layer_ids)


_WORDS = [
    *[
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "and",
        "we",
        "add",
        "two",
        "plus",
        "three",
        "to",
        "get",
        "five",
        "then",
        "say",
        "ok",
    ],
    *[
        "because",
        "numbers",
        "are",
        "fun",
        "so",
        "let",
        "us",
        "count",
        "one",
        "two",
        "three",
        "four",
        "six",
        "seven",
    ],
]


def write_tiny_regenerated(path: str, n: int = 24, seed: int = 0, answer_words: int = 12) -> str:
    """A regenerated-data JSONL (``status: ok``) of short ASCII conversations for tiny targets.

    Answers follow a simple deterministic pattern of the question, so a draft has something to learn.
    """
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            q = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 8)))
            a = " ".join(_WORDS[(len(q) + j) % len(_WORDS)] for j in range(answer_words))
            rec = {
                "id": f"c{i}",
                "status": "ok",
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            }
            f.write(json.dumps(rec) + "\n")
    return path


def tiny_recipe(model_dir: str, data_path: str, out_dir: str, algorithm: str = "eagle3", **sections) -> dict:
    """A recipe dict training a small draft on a tiny target (merge ``sections`` into the defaults)."""
    recipe = {
        "name": "tiny",
        "target": {"model": model_dir},
        "data": {"max_length": 96},
        "regeneration": {"output": data_path},
        "draft": {"algorithm": algorithm, "ttt_steps": 3}
        if algorithm == "eagle3"
        else {"algorithm": algorithm, "num_anchors": 8, "block_size": 4}
        | ({"markov_rank": 16} if algorithm == "dspark" else {}),
        "training": {
            "output_dir": out_dir,
            "lr": 3e-3,
            "warmup_ratio": 0.1,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "max_steps": 6,
            "log_every": 1,
            "save_every": 3,
            "keep_last": 2,
            "precision": "fp32",
        },
    }
    if algorithm != "eagle3":
        recipe["draft"]["num_layers"] = 1
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    return recipe
