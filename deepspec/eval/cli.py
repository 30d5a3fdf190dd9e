"""``deepspec eval``: accepted length of a draft on the benchmark suite (JSON + Markdown + PNG report).

Several processes: ``torchrun --nproc-per-node N -m deepspec eval ...``; rank r takes prompts
i % N == r, each prompt seeded from (seed, benchmark, index), and rank 0 merges and writes the report.
The work is done by :class:`deepspec.eval.evaluator.Evaluator`; this module maps options to it.
Exit status: 0, 2 (bad options), 3 (the draft failed the acceptance gate).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from deepspec.cli_args import add_recipe_arguments

if TYPE_CHECKING:
    from deepspec.eval.evaluator import EvalOptions

GATE_FAILED = 3  # exit status when the draft is below evaluation.gate (rules: deepspec.eval.summary)

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
    parser.add_argument(
        "--device", help="cpu | cuda | cuda:N | auto (default: cuda:LOCAL_RANK when available, else cpu)"
    )
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
    parser.add_argument(
        "--baseline-accept-length",
        type=float,
        help="macro accepted length of the serving draft: enables evaluation.gate.max_drop",
    )
    parser.add_argument(
        "--batch-size",
        help="comma-separated batch sizes (e.g. 1,8,32): decode that many prompts in lockstep and "
        "report accepted length and speedup per size (one process)",
    )
    parser.add_argument(
        "--sweep-prompts",
        type=int,
        metavar="N",
        help="with several --batch-size values: the speedup sweep decodes the same N prompts (round-robin "
        "across the benchmarks) at every size, the main report still all prompts (default: all)",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--select",
        action="store_true",
        help="instead of the benchmarks: decode the data.holdout prompts with every kept checkpoint of "
        "training.output_dir and write <output_dir>/selected naming the highest accepted length "
        "(--max-prompts caps the prompts)",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="[LABEL=]REPORT",
        help="instead of evaluating: write a results document (Markdown + plots) into --output from these "
        "report.json files or folders (drafts, the n-gram floor, any temperatures)",
    )
    parser.add_argument(
        "--commands", help="--compare: file of the commands that made the reports (quoted verbatim)"
    )
    parser.add_argument("--machine", help="--compare: the machine in words (default: read from this host)")
    parser.add_argument(
        "--notes",
        help="--compare: a hand-written Markdown section (the figures' interpretation), placed after the goals",
    )


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    from deepspec.eval.evaluator import EvalOptions

    return EvalOptions(
        checkpoint=args.checkpoint,
        drafter=args.drafter,
        output=args.output,
        benchmarks=[b.strip() for b in args.benchmarks.split(",") if b.strip()] if args.benchmarks else None,
        max_prompts=args.max_prompts,
        seed=args.seed,
        device=args.device,
        baseline=not args.no_baseline,
        confidence_threshold=args.confidence_threshold,
        scheduler=args.scheduler,
        calibration=args.calibration,
        calibrate=args.calibrate,
        termination_log=args.termination_log,
        progress=not args.no_progress,
        baseline_accept_length=args.baseline_accept_length,
        batch_sizes=parse_batch_sizes(args.batch_size) if args.batch_size else None,
        sweep_prompts=args.sweep_prompts,
    )


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``; each a positive integer."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes):
        raise SystemExit(
            f"error: --batch-size {text!r}: give positive integers separated by commas, e.g. 1,8,32"
        )
    return sizes


def run(args: argparse.Namespace) -> int:
    from deepspec.config import load_recipe
    from deepspec.eval.evaluator import EvalSetupError, Evaluator

    if args.compare:
        from deepspec.eval.compare import run_compare

        return run_compare(args.compare, args.output, args.commands, args.machine, args.notes)
    recipe = load_recipe(args.config, args.overrides)
    try:
        if args.select:
            from deepspec.eval.select import run_select

            return run_select(recipe, options_from_args(args))
        evaluator = Evaluator(recipe, options_from_args(args))
    except EvalSetupError as e:
        print(f"error: {e}")
        return 2
    outcome = evaluator.run()
    if outcome is None:  # ranks other than 0 only decode their share
        return 0
    print(outcome.markdown)
    print(f"report: {outcome.report_dir}")
    print(f"gate: {'passed' if outcome.gate.passed else 'FAILED'}: {outcome.gate.reason}")
    return 0 if outcome.gate.passed else GATE_FAILED
