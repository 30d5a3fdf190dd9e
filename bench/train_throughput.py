"""Draft training throughput: tokens/s, step time, padding, MFU and peak memory for Eagle3, DFlash and DSpark.

Set-up of the DESIGN's reference figures: a randomly initialised target with the exact Qwen3-4B shape
(and a SmolLM2-135M-shaped one), online features (the frozen target runs every step), bf16 autocast,
GSM8K-like sequences (mean ~177 tokens, answer tokens supervised). It drives the real
:class:`deepspec.train.trainer.Trainer` (same data path, DDP/FSDP2 wrapper, optimizer, accumulation).

Each row runs every ``--variant`` in the same process, one after the other, so ratios compare like
with like. A variant is ``NAME=GLOBAL_BATCH:MICRO_BATCH:MICRO_TOKENS:COMPILE`` (``-`` = unset), e.g.
the defaults ``baseline=16:4:-:off`` (the recipes' fixed micro-batches) and
``tokens=256:-:32768:off`` (length-sorted micro-batches of up to 32,768 padded tokens).

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
from dataclasses import dataclass
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


@dataclass
class Variant:
    """How one row is batched: ``NAME=GLOBAL_BATCH:MICRO_BATCH:MICRO_TOKENS:COMPILE`` (``-`` = unset)."""

    name: str
    global_batch: int
    micro_batch: int
    micro_tokens: int | None
    compile: str

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, _, spec = text.partition("=")
        parts = spec.split(":")
        if not name or len(parts) != 4 or parts[3] not in ("on", "off", "auto"):
            raise SystemExit(
                f"--variant {text!r}: expected NAME=GLOBAL_BATCH:MICRO_BATCH:MICRO_TOKENS:on|off"
            )
        gb, mb, tokens = (None if x == "-" else int(x) for x in parts[:3])
        if gb is None:
            raise SystemExit(f"--variant {text!r}: GLOBAL_BATCH is required")
        return cls(name, gb, mb or 1, tokens, parts[3])


def bench_one(args, shape: str, spec: str, variant: Variant, device: torch.device) -> dict:
    """One row; ``spec`` is an algorithm name, optionally with an Eagle3 draft vocabulary: ``eagle3:32000``."""
    from deepspec.config import Recipe
    from deepspec.testing.shapes import random_target
    from deepspec.train.trainer import StepStats, Trainer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    world = int(os.environ.get("WORLD_SIZE", 1))
    algorithm, _, vocab = spec.partition(":")
    target = random_target(shape, device, algorithm, dtype)
    draft: dict = {"algorithm": algorithm}
    if vocab:
        draft["draft_vocab_size"] = int(vocab)
    if algorithm != "eagle3":
        draft.update(num_layers=args.draft_layers, num_anchors=args.num_anchors, block_size=7)
    if args.tiny:
        draft.update({"ttt_steps": 3} if algorithm == "eagle3" else {"num_anchors": 8, "num_layers": 1})
        if algorithm == "dspark":
            draft["markov_rank"] = 16
    micro_batch = variant.micro_batch
    if variant.micro_tokens is None and variant.global_batch % (micro_batch * world):
        micro_batch = max(1, variant.global_batch // world)
    recipe = Recipe.model_validate({
        "draft": draft,
        "training": {"output_dir": tempfile.mkdtemp(prefix="bench-train-"), "global_batch_size": variant.global_batch,
                     "micro_batch_size": micro_batch, "micro_batch_tokens": variant.micro_tokens,
                     "compile": variant.compile, "parallelism": args.parallelism, "max_steps": 10**6,
                     "log_every": 10**6, "save_every": 10**6,
                     "precision": "bf16" if device.type == "cuda" else "fp32"},
    })  # fmt: skip
    sequences = gsm8k_like(
        variant.global_batch * (args.warmup + args.steps) + 8, target.vocab_size, args.seq_len
    )
    trainer = Trainer(
        recipe, device=str(device), resume=False, progress=False, target=target, sequences=sequences
    )
    trainer.model.train()
    t_warm = time.perf_counter()
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
        "variant": variant.name,
        "world_size": world,
        "parallelism": args.parallelism,
        "global_batch": variant.global_batch,
        "micro_batch": None if variant.micro_tokens else micro_batch,
        "micro_batch_tokens": variant.micro_tokens,
        "compiled": trainer.compiled,
        "micro_batches_per_step": stats.micro / args.steps,
        "mean_seq_len": args.seq_len,
        "steps": args.steps,
        "warmup_s": t0 - t_warm,
        "real_tokens_per_s": reduced["tokens"] / elapsed,
        "padding_fraction": reduced["padding_fraction"],
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
    p.add_argument(
        "--variant",
        action="append",
        help="NAME=GLOBAL_BATCH:MICRO_BATCH:MICRO_TOKENS:on|off (compile), repeatable; "
        "default: baseline=16:4:-:off and tokens=256:-:32768:off",
    )
    p.add_argument("--parallelism", choices=["ddp", "fsdp2"], default="ddp", help="under torchrun")
    p.add_argument("--seq-len", type=int, default=177, help="mean tokens per sequence (GSM8K-like)")
    p.add_argument("--num-anchors", type=int, default=512)
    p.add_argument("--draft-layers", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="tiny target and sizes (CPU smoke run)")
    p.add_argument("--out", required=True, help="JSON results path")
    args = p.parse_args()
    if args.tiny:
        args.targets, args.seq_len = "tiny", 48
        args.variant = args.variant or ["baseline=4:2:-:off", "tokens=8:-:256:off"]
        args.warmup, args.steps = 1, 2
    variants = [Variant.parse(v) for v in (args.variant or ["baseline=16:4:-:off", "tokens=256:-:32768:off"])]
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    meta = {"device": device_name, "world_size": world, "torch": torch.__version__, "args": vars(args)}
    results = []
    for shape in args.targets.split(","):
        for algorithm in args.algorithms.split(","):
            for variant in variants:
                device = torch.device(
                    args.device if args.device != "cuda" else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                )
                try:
                    r = bench_one(args, shape, algorithm, variant, device)
                except Exception as e:  # record (OOM, compile failure) and go on
                    r = {"target": shape, "algorithm": algorithm, "variant": variant.name,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"}  # fmt: skip
                results.append(r)
                if rank == 0:
                    print(json.dumps(r), flush=True)
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # partial results survive a kill
                    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    if rank == 0:
        print(
            f"\n{'target':<14}{'algo':<14}{'variant':<16}{'tok/s':>10}{'step s':>9}{'pad':>6}{'MFU':>7}{'GiB':>7}"
        )
        for r in results:
            if "error" in r:
                print(f"{r['target']:<14}{r['algorithm']:<14}{r['variant']:<16}  {r['error'][:60]}")
                continue
            mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            print(
                f"{r['target']:<14}{r['algorithm']:<14}{r['variant']:<16}{r['real_tokens_per_s']:>10,.0f}"
                f"{r['step_time_s']:>9.3f}{100 * r['padding_fraction']:>5.1f}%{mfu:>7}{mem:>7}"
            )
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
