"""``deepspec eval``: accepted length of a draft on the benchmark suite (JSON + Markdown + PNG report).

Several processes: ``torchrun --nproc-per-node N -m deepspec eval ...``; rank r takes prompts
i % N == r, each prompt seeded from (seed, benchmark, index), and rank 0 merges and writes the report.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from deepspec.cli_args import add_recipe_arguments

HELP = "measure accepted length (tau), acceptance and speedup of a draft on the benchmark suite"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument(
        "--checkpoint", help="draft checkpoint: step_<N> folder or training output dir (latest)"
    )
    parser.add_argument(
        "--drafter",
        choices=["checkpoint", "ngram"],
        default="checkpoint",
        help="'ngram' evaluates model-free prompt-lookup drafting (no checkpoint needed)",
    )
    parser.add_argument("--output", help="report directory (default: evaluation.output_dir)")
    parser.add_argument(
        "--benchmarks", help="comma-separated benchmark stems (default: evaluation.benchmarks)"
    )
    parser.add_argument(
        "--max-prompts", type=int, help="cap per benchmark (overrides evaluation.max_prompts)"
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed of the per-prompt samplers")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda:LOCAL_RANK when available)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the target-only decode (no speedup)")
    parser.add_argument(
        "--confidence-threshold", type=float, help="DSpark: drop slots whose prefix survival < X"
    )
    parser.add_argument(
        "--scheduler",
        help="DSpark prefix scheduler: 'auto' (profile the target now) or a cost-curve JSON file",
    )
    parser.add_argument("--calibration", help="DSpark: STS calibration JSON to apply to the confidence head")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="DSpark: fit STS on half of the prompts' rounds, report ECE before/after on the other half",
    )
    parser.add_argument("--termination-log", help="also write the compact summary (< 4 KiB) to this path")
    parser.add_argument("--no-progress", action="store_true")


def _dist_init(device: str) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def run(args: argparse.Namespace) -> int:
    import torch

    from deepspec.config import load_recipe
    from deepspec.eval.benchmarks import load_benchmarks
    from deepspec.eval.calibration import Calibration, CalibrationData, evaluate_held_out
    from deepspec.eval.checkpoints import load_target_and_draft, load_tokenizer, local_path
    from deepspec.eval.drafters import NGramDrafter
    from deepspec.eval.engine import EngineConfig, SpeculativeEngine
    from deepspec.eval.report import build_report, write_report
    from deepspec.eval.runner import (
        RunSettings,
        evaluate_benchmarks,
        merge_rank_files,
        stop_token_ids,
        write_rank_file,
    )
    from deepspec.eval.scheduler import CostCurve, PrefixScheduler, profile_cost_curve

    recipe = load_recipe(args.config, args.overrides)
    ev = recipe.evaluation
    if args.benchmarks:
        ev.benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    if args.max_prompts:
        ev.max_prompts = args.max_prompts
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    rank, world = _dist_init(device)
    out_dir = Path(args.output) if args.output else local_path(recipe, ev.output_dir)

    checkpoint: str | None = None
    if args.drafter == "ngram":
        from deepspec.target_model.model import TargetModel

        target = TargetModel.from_pretrained(
            recipe.target.model,
            recipe.draft.target_layer_ids,
            recipe.draft.algorithm,
            device=device,
            dtype=recipe.target.dtype,
            trust_remote_code=recipe.target.trust_remote_code,
        )
        drafter = NGramDrafter(target.vocab_size)
        algorithm = "ngram"
    else:
        if not args.checkpoint:
            print("error: --checkpoint is required (or --drafter ngram)")
            return 2
        target, draft, ckpt = load_target_and_draft(recipe, args.checkpoint, device)
        drafter = draft.as_drafter(target)
        algorithm = draft.algorithm
        checkpoint = str(ckpt)
    tokenizer = load_tokenizer(target)

    scheduler = None
    if args.scheduler == "auto":
        curve = profile_cost_curve(target, max_tokens=ev.num_proposals + 1)
        scheduler = PrefixScheduler(curve)
    elif args.scheduler:
        scheduler = PrefixScheduler(CostCurve.from_dict(json.loads(Path(args.scheduler).read_text())))
    calibration = Calibration.load(args.calibration) if args.calibration else None

    cfg = EngineConfig(
        num_proposals=ev.num_proposals,
        temperature=ev.temperature,
        max_new_tokens=ev.max_new_tokens,
        stop_token_ids=stop_token_ids(tokenizer, target.config),
        confidence_threshold=args.confidence_threshold,
        record_rounds=args.calibrate,
    )
    engine = SpeculativeEngine(target, drafter, cfg, scheduler=scheduler, calibration=calibration)
    settings = RunSettings(
        seed=args.seed,
        all_turns=ev.all_turns,
        thinking=ev.thinking,
        baseline=not args.no_baseline,
        progress=not args.no_progress,
    )
    benchmarks = load_benchmarks(ev)
    results, records = evaluate_benchmarks(engine, tokenizer, benchmarks, settings, rank, world)
    write_rank_file(results, records, out_dir, rank)
    _barrier(world)
    if rank != 0:
        return 0
    results, records = merge_rank_files(out_dir, world)

    cal_report = None
    if args.calibrate:
        rounds = [(r.confidence, r.accepted) for _, _, r in records if r.confidence]
        if len(rounds) < 20:
            print(f"warning: only {len(rounds)} rounds with confidences: skipping STS calibration")
        else:
            # split by prompt so held-out rounds come from unseen prompts
            fit = [(r.confidence, r.accepted) for _, i, r in records if r.confidence and i % 2 == 0]
            held = [(r.confidence, r.accepted) for _, i, r in records if r.confidence and i % 2 == 1]
            cal = evaluate_held_out(CalibrationData.from_rounds(fit), CalibrationData.from_rounds(held))
            cal.save(out_dir / "calibration.json")
            cal_report = cal.to_dict()
            print(f"STS calibration: held-out ECE {cal.mean_ece_before:.4f} -> {cal.mean_ece_after:.4f}")

    protocol = {
        "temperature": ev.temperature,
        "num_proposals": ev.num_proposals,
        "max_new_tokens": ev.max_new_tokens,
        "all_turns": ev.all_turns,
        "thinking": ev.thinking,
        "seed": args.seed,
        "shuffle_seed": ev.shuffle_seed,
        "confidence_threshold": args.confidence_threshold,
        "scheduler": scheduler.curve.to_dict() if scheduler else None,
        "calibration": args.calibration,
    }
    report = build_report(
        results,
        algorithm=algorithm,
        target=recipe.target.model,
        target_revision=recipe.target.revision,
        checkpoint=checkpoint,
        protocol=protocol,
        world_size=world,
        calibration=cal_report,
    )
    paths = write_report(report, out_dir, args.termination_log)
    print((out_dir / "report.md").read_text(encoding="utf-8"))
    print(f"report: {paths['json']}")
    gate = ev.gate
    if gate.min_accept_length is not None and report["macro"]["tau"] < gate.min_accept_length:
        print(
            f"gate: macro tau {report['macro']['tau']:.3f} < evaluation.gate.min_accept_length {gate.min_accept_length}"
        )
        return 3
    return 0
