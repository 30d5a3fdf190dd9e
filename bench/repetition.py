"""How much of SmolLM2's own answer is a copy of text it has already seen, at T = 0 and at T = 1.

The n-gram (prompt lookup) drafter proposes the continuation of the latest earlier occurrence of the
last few tokens, so its accepted length measures exactly this: an answer that repeats itself is easy
to draft by copying. ``docs/results.md`` found the floor at 2.93 at T = 0 and 1.19 at T = 1; this script
checks the explanation directly on the target's answers, with no drafter involved.

For the first ``--prompts`` prompts of each benchmark (the evaluation's order: shuffle seed 0, first user
turn, thinking off) it generates ``--max-new-tokens`` tokens with plain ``transformers`` ``generate``
(greedy, and sampled at T = 1 with a fixed seed) and reports:

* ``copied``: the fraction of generated tokens whose preceding ``n`` tokens (prompt and answer so far)
  occurred earlier followed by the same token: what a perfect ``n``-gram lookup would get right;
* ``eos``: the fraction of answers that ended before the token limit (a looping answer runs to it).

    python bench/repetition.py --out bench/results/repetition_smollm2_cpu.json   # CPU, a few minutes
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

import torch


def copied_fraction(prompt: list[int], answer: list[int], n: int) -> float:
    """Fraction of ``answer`` tokens predicted by the latest earlier occurrence of their ``n``-token context."""
    seq = prompt + answer
    last_next: dict[tuple[int, ...], int] = {}  # n-gram -> the token that followed its latest occurrence
    for i in range(n, len(prompt)):
        last_next[tuple(seq[i - n : i])] = seq[i]
    hits = 0
    for i in range(len(prompt), len(seq)):
        key = tuple(seq[i - n : i])
        hits += last_next.get(key) == seq[i]
        last_next[key] = seq[i]
    return hits / max(len(answer), 1)


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepspec.config import EvaluationConfig
    from deepspec.data.template import render_prompt
    from deepspec.eval.benchmarks import load_benchmarks
    from deepspec.target_model.files import resolve_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--benchmarks-dir", default="../shared/datasets/eval")
    ap.add_argument("--prompts", type=int, default=1, help="prompts per benchmark")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--ngram", type=int, default=3, help="context length of the lookup")
    ap.add_argument("--out")
    args = ap.parse_args()

    torch.manual_seed(0)
    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = EvaluationConfig(max_prompts=args.prompts)
    rows = []
    t0 = time.perf_counter()
    for name, prompts in load_benchmarks(cfg, args.benchmarks_dir).items():
        for p in prompts:
            ids = render_prompt(tok, [{"role": "user", "content": p.turns[0]}], {"enable_thinking": False})
            for temperature in (0.0, 1.0):
                torch.manual_seed(p.index)  # generate() samples from the global generator
                sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
                with torch.inference_mode():
                    out = model.generate(
                        torch.tensor([ids]), max_new_tokens=args.max_new_tokens, pad_token_id=tok.eos_token_id,
                        **(sampling if temperature else {"do_sample": False}),
                    )  # fmt: skip
                answer = out[0, len(ids) :].tolist()
                ended = tok.eos_token_id in answer or len(answer) < args.max_new_tokens
                rows.append({"benchmark": name, "index": p.index, "temperature": temperature,
                             "new_tokens": len(answer), "eos": ended,
                             "copied": round(copied_fraction(ids, answer, args.ngram), 4)})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for temperature in (0.0, 1.0):
        mine = [r for r in rows if r["temperature"] == temperature]
        summary[f"T={temperature:g}"] = {
            "answers": len(mine),
            "mean_new_tokens": round(sum(r["new_tokens"] for r in mine) / len(mine), 1),
            "copied_token_weighted": round(
                sum(r["copied"] * r["new_tokens"] for r in mine) / max(sum(r["new_tokens"] for r in mine), 1),
                4,
            ),
            "ended_before_limit": round(sum(r["eos"] for r in mine) / len(mine), 3),
        }
    result = {
        "command": "python bench/repetition.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"
        ),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}",
        "wall_s": round(time.perf_counter() - t0, 1),
        "summary": summary,
        "rows": rows,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
