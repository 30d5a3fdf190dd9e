"""Speculative-decoding engine speed: time per verification round and tokens/s with and without drafts.

Targets (random init from the exact config unless --model is given):
  smollm2   SmolLM2-135M shape (Llama, 30 layers, H 576, vocab 49,152)
  qwen3-4b  Qwen3-4B shape (36 layers, H 2560, vocab 151,936)
  tiny      a 4-layer tiny Llama (CPU smoke run; same as --tiny)

For each algorithm the untrained draft (or --checkpoint) drives the engine at T=0 on random prompts;
figures: target verification forward of g+1 tokens (the round's floor), whole round time (draft +
verify + bookkeeping), speculative and plain decode tokens/s, and the accepted length (an untrained
draft accepts ~nothing, so there the speedup is < 1 and only the per-round costs are meaningful).

    python bench/eval_speed.py --tiny                       # CPU smoke
    python bench/eval_speed.py --target smollm2 --device cuda
    python bench/eval_speed.py --target qwen3-4b --device cuda --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_target(args: argparse.Namespace, algorithm: str):
    from deepspec.target_model.model import TargetModel
    from deepspec.testing.shapes import random_target

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model:
        return TargetModel.from_pretrained(args.model, None, algorithm, device=device, dtype=dtype)
    return random_target(args.target, device, algorithm, dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_algorithm(args: argparse.Namespace, algorithm: str) -> dict:
    from deepspec.config import draft_model_config
    from deepspec.eval.engine import EngineConfig, SpeculativeEngine
    from deepspec.eval.metrics import AcceptanceStats
    from deepspec.eval.scheduler import profile_cost_curve
    from deepspec.models import build_draft, load_draft

    target = build_target(args, algorithm)
    device = target.lm_head.weight.device
    if args.checkpoint:
        draft = load_draft(args.checkpoint, target)
    else:
        torch.manual_seed(0)
        draft = build_draft(draft_model_config(algorithm=algorithm), target)
    draft.to(dtype=target.lm_head.weight.dtype).eval()
    cfg = EngineConfig(num_proposals=args.num_proposals, temperature=0.0, max_new_tokens=args.new_tokens)
    engine = SpeculativeEngine(target, draft.as_drafter(target), cfg)
    gen = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(3, target.vocab_size, (args.prompt_len,), generator=gen).tolist()
        for _ in range(args.prompts)
    ]

    # warm-up (kernels, allocator)
    engine.generate(prompts[0][:16])
    engine.generate_plain(prompts[0][:16])

    # the target's verification forward alone, for g + 1 tokens after a typical context
    curve = profile_cost_curve(
        target,
        max_tokens=args.num_proposals + 1,
        context_len=args.prompt_len + args.new_tokens // 2,
        repeats=args.repeats,
    )

    spec, base = AcceptanceStats(), AcceptanceStats()
    for p in prompts:
        spec += engine.generate(p).stats
        base += engine.generate_plain(p).stats
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "algorithm": algorithm,
        "verify_forward_ms": {str(n): round(s * 1e3, 3) for n, s in enumerate(curve.seconds, start=1)},
        "verify_forward_ms_g_plus_1": round(curve.seconds[-1] * 1e3, 3),
        "round_ms": round(spec.decode_seconds / max(spec.rounds, 1) * 1e3, 3),
        "spec_tokens_per_s": round(spec.tokens_per_second, 1),
        "plain_tokens_per_s": round(base.tokens_per_second, 1),
        "plain_step_ms": round(base.decode_seconds / max(base.rounds, 1) * 1e3, 3),
        "speedup": round(spec.tokens_per_second / base.tokens_per_second, 3)
        if base.tokens_per_second
        else None,
        "tau": round(spec.tau, 3),
        "rounds": spec.rounds,
        "new_tokens": spec.new_tokens,
        "peak_gib": round(peak, 2) if peak is not None else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=["smollm2", "qwen3-4b", "tiny"], default="smollm2")
    ap.add_argument("--model", help="real weights: a local HF dir (or 'smollm2' where gguf is installed)")
    ap.add_argument(
        "--checkpoint", help="a trained draft checkpoint (step_<N>) instead of an untrained draft"
    )
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny random target")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--algorithms", default="eagle3,dflash,dspark")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=87)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--num-proposals", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument(
        "--out", help="JSON results path (default bench/results/eval_speed_<target>_<device>.json)"
    )
    args = ap.parse_args()
    if args.tiny:
        args.target, args.device = "tiny", "cpu"
        args.prompts, args.prompt_len, args.new_tokens, args.repeats = 2, 24, 24, 3
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))

    rows = []
    for algorithm in [a.strip() for a in args.algorithms.split(",") if a.strip()]:
        t0 = time.perf_counter()
        row = bench_algorithm(args, algorithm)
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    name = args.model.replace("/", "_") if args.model else args.target
    header = f"{'algorithm':<8} {'verify g+1 ms':>13} {'round ms':>9} {'plain ms':>9} {'spec tok/s':>10} {'plain tok/s':>11} {'speedup':>8} {'tau':>6}"
    print(
        f"target {name} on {args.device}, {args.prompts} prompts x {args.new_tokens} new tokens, g={args.num_proposals}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['algorithm']:<8} {r['verify_forward_ms_g_plus_1']:>13.3f} {r['round_ms']:>9.3f} {r['plain_step_ms']:>9.3f} "
            f"{r['spec_tokens_per_s']:>10.1f} {r['plain_tokens_per_s']:>11.1f} {r['speedup'] or 0:>8.3f} {r['tau']:>6.3f}"
        )
    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    )
    result = {
        "target": name,
        "device": device_name,
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": rows,
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"eval_speed_{name}_{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
