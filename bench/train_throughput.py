"""Draft training throughput: tokens/s, step time and peak memory for Eagle3, DFlash and DSpark.

Set-up of the DESIGN's reference figures: a randomly initialised target with the exact Qwen3-4B shape
(and a SmolLM2-135M-shaped one), online features (the frozen target runs every step), bf16 autocast,
GSM8K-like sequences (mean ~177 tokens, answer tokens supervised), global batch 16. It drives the real
:class:`deepspec.train.trainer.Trainer` (same data path, DDP wrapper, optimizer, accumulation).

    python bench/train_throughput.py --device cuda --out bench/results/train_h100.json
    torchrun --nproc-per-node 2 bench/train_throughput.py --device cuda --out bench/results/train_2gpu.json
    python bench/train_throughput.py --tiny --out /tmp/train_cpu.json          # CPU smoke run

Real tokens/s counts non-padding tokens of all ranks per optimizer step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gsm8k_like(n: int, vocab: int, mean_len: int, seed: int = 0):
    """Sequences of ~mean_len tokens (uniform +-35%), the last ~60% supervised (the answer)."""
    from deepspec.data.sequences import TokenizedSequence

    g = torch.Generator().manual_seed(seed)
    out = []
    lo, hi = int(mean_len * 0.65), int(mean_len * 1.35)
    for i in range(n):
        t = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = torch.randint(10, vocab, (t,), generator=g)
        mask = torch.zeros(t, dtype=torch.long)
        mask[int(t * 0.4) :] = 1
        out.append(TokenizedSequence(f"s{i}", ids, mask))
    return out


def bench_one(args, shape: str, spec: str, device: torch.device) -> dict:
    """One row; ``spec`` is an algorithm name, optionally with an Eagle3 draft vocabulary: ``eagle3:32000``."""
    from deepspec.config import Recipe
    from deepspec.testing.shapes import random_target
    from deepspec.train.trainer import StepStats, Trainer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    world = int(os.environ.get("WORLD_SIZE", 1))
    algorithm, _, vocab = spec.partition(":")
    target = random_target(shape, device, algorithm, dtype)
    draft = {"algorithm": algorithm}
    if vocab:
        draft["draft_vocab_size"] = int(vocab)
    if algorithm != "eagle3":
        draft.update(num_layers=args.draft_layers, num_anchors=args.num_anchors, block_size=7)
    if args.tiny:
        draft.update(
            ttt_steps=3, num_anchors=8, markov_rank=16, num_layers=1 if algorithm != "eagle3" else None
        )
    recipe = Recipe.model_validate({
        "draft": draft,
        "training": {"output_dir": tempfile.mkdtemp(prefix="bench-train-"), "global_batch_size": args.global_batch,
                     "micro_batch_size": args.micro_batch, "max_steps": 10**6, "log_every": 10**6,
                     "save_every": 10**6, "precision": "bf16" if device.type == "cuda" else "fp32"},
    })  # fmt: skip
    sequences = gsm8k_like(
        args.global_batch * (args.warmup + args.steps) + 8, target.vocab_size, args.seq_len
    )
    trainer = Trainer(
        recipe, device=str(device), resume=False, progress=False, target=target, sequences=sequences
    )
    trainer.model.train()
    for _ in range(args.warmup):
        trainer.train_step(StepStats())
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    stats = StepStats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(stats)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    reduced = trainer._reduce(stats)
    result = {
        "target": shape,
        "algorithm": spec,
        "world_size": world,
        "global_batch": args.global_batch,
        "micro_batch": args.micro_batch,
        "mean_seq_len": args.seq_len,
        "steps": args.steps,
        "real_tokens_per_s": reduced["tokens"] / elapsed,
        "step_time_s": elapsed / args.steps,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loss": reduced["loss"],
        "draft_params_m": sum(p.numel() for p in trainer.draft.parameters()) / 1e6,
    }
    if trainer.peak_flops:
        result["mfu"] = result["real_tokens_per_s"] * trainer.flops_per_token / (trainer.peak_flops * world)
    del trainer, target
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--targets", default="smollm2-135m,qwen3-4b")
    p.add_argument(
        "--algorithms",
        default="eagle3,eagle3:32000,dflash,dspark",
        help="comma list; 'eagle3:N' trains Eagle3 with a reduced draft vocabulary of N tokens",
    )
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=177, help="mean tokens per sequence (GSM8K-like)")
    p.add_argument("--num-anchors", type=int, default=512)
    p.add_argument("--draft-layers", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="tiny target and sizes (CPU smoke run)")
    p.add_argument("--out", required=True, help="JSON results path")
    args = p.parse_args()
    if args.tiny:
        args.targets, args.seq_len, args.global_batch, args.micro_batch = "tiny", 48, 4, 2
        args.warmup, args.steps = 1, 2
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.global_batch % (args.micro_batch * world):
        args.micro_batch = max(1, args.global_batch // world)
    results = []
    for shape in args.targets.split(","):
        for algorithm in args.algorithms.split(","):
            device = torch.device(
                args.device if args.device != "cuda" else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            )
            try:
                r = bench_one(args, shape, algorithm, device)
            except torch.OutOfMemoryError as e:  # record and go on
                r = {"target": shape, "algorithm": algorithm, "error": f"OOM: {str(e)[:200]}"}
            results.append(r)
            if rank == 0:
                print(json.dumps(r), flush=True)
    if rank == 0:
        device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        meta = {"device": device_name, "world_size": world, "torch": torch.__version__, "args": vars(args)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        print(f"\n{'target':<14}{'algo':<14}{'tok/s':>10}{'step s':>9}{'peak GiB':>10}")
        for r in results:
            if "error" in r:
                print(f"{r['target']:<14}{r['algorithm']:<14}  {r['error'][:60]}")
                continue
            mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
            print(
                f"{r['target']:<14}{r['algorithm']:<14}{r['real_tokens_per_s']:>10,.0f}{r['step_time_s']:>9.3f}{mem:>10}"
            )
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
