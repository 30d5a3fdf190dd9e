"""Draft training throughput: tokens/s, step time, padding, MFU and peak memory for Eagle3, DFlash and DSpark.

Set-up of the DESIGN's reference figures: a randomly initialised target with the exact Qwen3-4B shape
(and a SmolLM2-135M-shaped one), online features (the frozen target runs every step), bf16 autocast,
GSM8K-like sequences (mean ~177 tokens, answer tokens supervised) or, with ``--real-lengths``, the
lengths and assistant spans of real regenerated data (``bench/train_lengths.py``). It drives the real
:class:`deepspec.train.trainer.Trainer` (same data path, DDP/FSDP2 wrapper, optimizer, accumulation).

Each row runs every ``--variant`` in the same process, one after the other, on the same sequences, so
ratios compare like with like. A variant is ``NAME=GLOBAL_BATCH:MICRO_BATCH:MICRO_TOKENS:COMPILE[:packing]``
(``-`` = unset; the optional fifth field turns ``training.packing`` on), e.g. the defaults
``baseline=16:4:-:off`` (the recipes' fixed micro-batches) and ``tokens=256:-:32768:off`` (length-sorted
micro-batches of up to 32,768 padded tokens); ``packed=64:-:32768:off:packing`` packs several sequences
per row (rows as long as the longest sequence, 32,768 // that length rows per micro-batch).

``--check-packing`` first checks on the device, for each algorithm, that a packed micro-batch gives the
same draft hidden states and loss as the same sequences padded (``bench/train_packing_check.py``: on CUDA
the flex-attention packed block mask of DFlash/DSpark); it prints CHECK PASSED / CHECK FAILED and a
failure makes the exit status 1 (the timing still runs). ``--profile PATH`` profiles a few steps of the
first row after its timing (``bench/train_profile.py``: top-30 table, kernel launches, copies, syncs and
device-busy fraction per step).

Next H200 call (issue 11, packing; ~2-3 minutes: three algorithms x two variants of 3 warm-up + 4 steps,
the checks and a 3-step profile), SmolLM2 shape and recipes (64 sequences per step, 32k-token
micro-batches, DFlash/DSpark 2 layers and 64 anchors), the real answers' lengths (on CPU the samplers
give 35.6 % padding padded, as the real run's 36 %, and 6.5 % packed). The packed variant comes first so
that the profile shows the packed Eagle3 step (the farthest from the 150k tokens/s goal). Three warm-up
steps: the compiled flex attention recompiles when a micro-batch's shape changes (the second shape makes
it dynamic), which should stay out of the timed steps:

    python bench/train_throughput.py --device cuda --targets smollm2 --algorithms eagle3,dflash,dspark \
        --real-lengths bench/train_lengths_smollm2.json.gz --draft-layers 2 --num-anchors 64 \
        --variant packed=64:-:32768:off:packing --variant padded=64:-:32768:off --warmup 3 --steps 4 \
        --check-packing --profile $OUT/train_profile_h200.txt --out $OUT/train_packing_h200.json

Other uses:

    python bench/train_throughput.py --device cuda --out bench/results/train_h100.json
    torchrun --nproc-per-node 2 bench/train_throughput.py --device cuda --out bench/results/train_2gpu.json
    python bench/train_throughput.py --tiny --out /tmp/train_cpu.json          # CPU smoke run
    python bench/train_throughput.py --tiny --algorithms eagle3,dflash,dspark \
        --real-lengths bench/train_lengths_smollm2.json.gz --variant pad=16:-:4096:off \
        --variant pack=16:-:4096:off:packing --check-packing --profile /tmp/p.txt --out /tmp/t.json

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
    """How one row is batched: ``NAME=GLOBAL_BATCH:MICRO_BATCH:MICRO_TOKENS:COMPILE[:packing]`` (``-`` =
    unset); the optional fifth field ``packing`` (or ``pack``) turns ``training.packing`` on."""

    name: str
    global_batch: int
    micro_batch: int
    micro_tokens: int | None
    compile: str
    packing: bool = False

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, _, spec = text.partition("=")
        parts = spec.split(":")
        packing = len(parts) == 5 and parts[4] in ("pack", "packing")
        if (
            not name
            or len(parts) not in (4, 5)
            or parts[3] not in ("on", "off", "auto")
            or (len(parts) == 5 and not packing)
        ):
            raise SystemExit(
                f"--variant {text!r}: expected NAME=GLOBAL_BATCH:MICRO_BATCH:MICRO_TOKENS:on|off[:packing]"
            )
        gb, mb, tokens = (None if x == "-" else int(x) for x in parts[:3])
        if gb is None:
            raise SystemExit(f"--variant {text!r}: GLOBAL_BATCH is required")
        return cls(name, gb, mb or 1, tokens, parts[3], packing)


def draft_section(args, spec: str) -> dict:
    """The recipe's ``draft`` section for ``spec`` (``eagle3``, ``eagle3:32000``, ``dflash``, ``dspark``)."""
    algorithm, _, vocab = spec.partition(":")
    draft: dict = {"algorithm": algorithm}
    if vocab:
        draft["draft_vocab_size"] = int(vocab)
    if algorithm != "eagle3":
        draft.update(num_layers=args.draft_layers, num_anchors=args.num_anchors, block_size=7)
    if args.tiny:
        draft.update({"ttt_steps": 3} if algorithm == "eagle3" else {"num_anchors": 8, "num_layers": 1})
        if algorithm == "dspark":
            draft["markov_rank"] = 16
    return draft


def build_trainer(args, target, spec: str, variant: Variant, sequences: list, device: torch.device):
    """A :class:`~deepspec.train.trainer.Trainer` of ``variant`` over ``sequences`` on a given target."""
    from deepspec.config import Recipe
    from deepspec.train.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", 1))
    micro_batch = variant.micro_batch
    if variant.micro_tokens is None and variant.global_batch % (micro_batch * world):
        micro_batch = max(1, variant.global_batch // world)
    recipe = Recipe.model_validate({
        "draft": draft_section(args, spec),
        "training": {"output_dir": tempfile.mkdtemp(prefix="bench-train-"), "global_batch_size": variant.global_batch,
                     "micro_batch_size": micro_batch, "micro_batch_tokens": variant.micro_tokens,
                     "packing": variant.packing, "compile": variant.compile, "parallelism": args.parallelism,
                     "max_steps": 10**6, "log_every": 10**6, "save_every": 10**6,
                     "precision": "bf16" if device.type == "cuda" else "fp32"},
    })  # fmt: skip
    return Trainer(
        recipe, device=str(device), resume=False, progress=False, target=target, sequences=sequences
    )


def bench_one(
    args, shape: str, spec: str, variant: Variant, device: torch.device, sequences: list,
    profile_path: str | None = None,
) -> dict:  # fmt: skip
    """One row; ``spec`` is an algorithm name, optionally with an Eagle3 draft vocabulary: ``eagle3:32000``.

    ``profile_path``: after timing, profile a few more steps of the same trainer into that file."""
    from deepspec.testing.shapes import random_target
    from deepspec.train.trainer import StepStats

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    world = int(os.environ.get("WORLD_SIZE", 1))
    target = random_target(shape, device, spec.partition(":")[0], dtype)
    trainer = build_trainer(args, target, spec, variant, sequences, device)
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
    shape_packed = trainer.packed_shape
    result = {
        "target": shape,
        "algorithm": spec,
        "variant": variant.name,
        "world_size": world,
        "parallelism": args.parallelism,
        "global_batch": variant.global_batch,
        "micro_batch": None if variant.micro_tokens else trainer.recipe.training.micro_batch_size,
        "micro_batch_tokens": variant.micro_tokens,
        "packing": variant.packing,
        "packed_rows": None if shape_packed is None else [shape_packed.rows, shape_packed.row_length],
        "compiled": trainer.compiled,
        "micro_batches_per_step": stats.micro / args.steps,
        "mean_seq_len": sum(trainer.features.lengths) / len(trainer.features.lengths),
        "lengths": args.real_lengths or f"gsm8k-like mean {args.seq_len}",
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
    if profile_path:
        from train_profile import profile_steps  # bench/train_profile.py

        header = f"{shape} {spec} variant {variant.name} ({variant}), {device}, {args.profile_steps} steps"
        result["profile"] = profile_steps(trainer, args.profile_steps, profile_path, header)
    del trainer, target
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def make_sequences(args, vocab: int, variants: list[Variant]) -> list:
    """The sequences every row of a target trains on (the same for every algorithm and variant)."""
    n = max(v.global_batch for v in variants) * (args.warmup + args.steps + args.profile_steps + 1) + 8
    if args.real_lengths:
        from train_lengths import load_length_profile, sequences_from_profile  # bench/train_lengths.py

        return sequences_from_profile(load_length_profile(args.real_lengths), n, vocab)
    return gsm8k_like(n, vocab, args.seq_len)


def run_packing_checks(args, shape: str, variants: list[Variant], device: torch.device) -> list[dict]:
    """:func:`train_packing_check.check_packing` for every algorithm, on the first packing variant's
    micro-batch shape (or the first variant's, packed)."""
    from train_packing_check import check_packing, describe  # bench/train_packing_check.py

    from deepspec.testing.shapes import random_target

    base = next((v for v in variants if v.packing), variants[0])
    variant = Variant("check", base.global_batch, base.micro_batch, base.micro_tokens, "off", True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    checks = []
    for spec in args.algorithms.split(","):
        try:
            target = random_target(shape, device, spec.partition(":")[0], dtype)
            trainer = build_trainer(
                args, target, spec, variant, make_sequences(args, target.vocab_size, variants), device
            )
            check = {"target": shape, "spec": spec, **check_packing(trainer)}
            del trainer, target
        except Exception as e:  # a crash of the packed path is a failed check too
            check = {
                "target": shape,
                "spec": spec,
                "passed": False,
                "error": f"{type(e).__name__}: {str(e)[:500]}",
            }
        if int(os.environ.get("RANK", 0)) == 0:
            print(
                describe(check) if "error" not in check else f"CHECK FAILED packing {spec}: {check['error']}",
                flush=True,
            )
        checks.append(check)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return checks


def print_table(results: list[dict]) -> None:
    print(
        f"\n{'target':<14}{'algo':<14}{'variant':<16}{'pack':>5}{'tok/s':>10}{'step s':>9}{'pad':>7}{'MFU':>7}"
        f"{'GiB':>7}{'mb/step':>8}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['target']:<14}{r['algorithm']:<14}{r['variant']:<16}  {r['error'][:60]}")
            continue
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(
            f"{r['target']:<14}{r['algorithm']:<14}{r['variant']:<16}{'yes' if r['packing'] else 'no':>5}"
            f"{r['real_tokens_per_s']:>10,.0f}{r['step_time_s']:>9.3f}{100 * r['padding_fraction']:>6.1f}%"
            f"{mfu:>7}{mem:>7}{r['micro_batches_per_step']:>8.1f}"
        )


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
        help="NAME=GLOBAL_BATCH:MICRO_BATCH:MICRO_TOKENS:on|off[:packing] (compile; packing turns "
        "training.packing on), repeatable; default: baseline=16:4:-:off and tokens=256:-:32768:off",
    )
    p.add_argument("--parallelism", choices=["ddp", "fsdp2"], default="ddp", help="under torchrun")
    p.add_argument(
        "--seq-len", type=int, help="mean tokens per sequence (GSM8K-like; default 177, 48 with --tiny)"
    )
    p.add_argument(
        "--real-lengths",
        help="sequence lengths and assistant spans of real data instead of GSM8K-like ones: a profile "
        "(bench/train_lengths_smollm2.json.gz) or a regenerated JSONL (tokenised with SmolLM2's tokenizer)",
    )
    p.add_argument("--num-anchors", type=int, default=512)
    p.add_argument("--draft-layers", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--check-packing",
        action="store_true",
        help="before timing, check on the device that a packed micro-batch gives the padded loss, per "
        "algorithm (prints CHECK PASSED / CHECK FAILED; a failure makes the exit status 1)",
    )
    p.add_argument("--profile", metavar="PATH", help="after timing, torch.profiler table of the first row")
    p.add_argument("--profile-steps", type=int, default=3, help="optimizer steps in the profile")
    p.add_argument("--tiny", action="store_true", help="tiny target and sizes (CPU smoke run)")
    p.add_argument("--out", required=True, help="JSON results path")
    args = p.parse_args()
    if args.tiny:
        args.targets, args.seq_len = "tiny", args.seq_len or 48
        args.variant = args.variant or ["baseline=4:2:-:off", "tokens=8:-:256:off"]
        args.warmup, args.steps, args.profile_steps = 1, 2, min(args.profile_steps, 2)
    args.seq_len = args.seq_len or 177
    if not args.profile:
        args.profile_steps = 0
    variants = [Variant.parse(v) for v in (args.variant or ["baseline=16:4:-:off", "tokens=256:-:32768:off"])]
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    meta = {"device": device_name, "world_size": world, "torch": torch.__version__, "args": vars(args),
            "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}  # fmt: skip
    device = torch.device(
        args.device if args.device != "cuda" else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    )
    checks: list[dict] = []
    results: list[dict] = []

    def save() -> None:  # partial results survive a kill
        if rank == 0:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(
                json.dumps({"meta": meta, "checks": checks, "results": results}, indent=2)
            )

    for shape in args.targets.split(","):
        if args.check_packing:
            checks += run_packing_checks(args, shape, variants, device)
            save()
        vocab = None
        sequences: list = []
        for algorithm in args.algorithms.split(","):
            for variant in variants:
                profile = args.profile if args.profile and not results else None
                try:
                    if vocab is None:  # every algorithm and variant trains on the same sequences
                        from deepspec.testing.shapes import ALIASES, SHAPES

                        vocab = SHAPES[ALIASES.get(shape, shape)]["vocab_size"]
                        sequences = make_sequences(args, vocab, variants)
                    r = bench_one(args, shape, algorithm, variant, device, sequences, profile)
                except Exception as e:  # record (OOM, compile failure) and go on
                    r = {"target": shape, "algorithm": algorithm, "variant": variant.name,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"}  # fmt: skip
                results.append(r)
                if rank == 0:
                    print(json.dumps(r), flush=True)
                save()
    failed = [c for c in checks if not c["passed"]]
    if rank == 0:
        print_table(results)
        if args.check_packing:
            print(f"\nCHECK {'FAILED' if failed else 'PASSED'}: packed == padded for "
                  f"{len(checks) - len(failed)} of {len(checks)} target/algorithm pairs")  # fmt: skip
        if args.profile:
            print(f"profile: {args.profile}")
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
