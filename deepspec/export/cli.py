"""``deepspec export``: write a draft checkpoint in the SGLang or vLLM format, validated by reloading."""

from __future__ import annotations

import argparse
from pathlib import Path

from deepspec.cli_args import add_recipe_arguments

HELP = (
    "export a draft checkpoint for SGLang / vLLM (validated; refused when the smoke accepted length is low)"
)

SMOKE_PROMPTS = (
    "What is 12 times 7? Answer briefly.",
    "Write a Python function that returns the square of a number.",
    "List three colours of the rainbow.",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--checkpoint", required=True, help="step_<N> folder or training output dir (latest)")
    parser.add_argument(
        "--format", choices=["sglang", "vllm"], help="serving engine (default: export.format)"
    )
    parser.add_argument("--output", help="export directory (default: export.output_dir)")
    parser.add_argument(
        "--force", action="store_true", help="export even when the smoke accepted length is low"
    )
    parser.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--smoke-tokens", type=int, default=32, help="new tokens per smoke prompt")


def run(args: argparse.Namespace) -> int:
    from deepspec.config import load_recipe
    from deepspec.data.template import render_prompt, template_kwargs
    from deepspec.eval.checkpoints import load_target_and_draft, load_tokenizer, local_path
    from deepspec.eval.runner import stop_token_ids
    from deepspec.export.exporter import export_draft, smoke_accept_length

    recipe = load_recipe(args.config, args.overrides)
    fmt = args.format or recipe.export.format
    force = args.force or recipe.export.force
    out = Path(args.output) if args.output else local_path(recipe, recipe.export.output_dir)
    target, draft, ckpt = load_target_and_draft(recipe, args.checkpoint, args.device)
    tokenizer = load_tokenizer(target)
    kwargs = template_kwargs(recipe.regeneration, thinking=recipe.evaluation.thinking)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": p}], kwargs) for p in SMOKE_PROMPTS]
    tau = smoke_accept_length(
        target,
        draft,
        prompts,
        max_new_tokens=args.smoke_tokens,
        num_proposals=recipe.evaluation.num_proposals,
        stop_token_ids=stop_token_ids(tokenizer, target.config),
    )
    floor = recipe.export.min_smoke_accept_length
    print(f"smoke test: accepted length {tau:.3f} over {len(prompts)} greedy prompts (floor {floor})")
    if tau < floor and not force:
        print(
            f"error: refusing to export {ckpt}: smoke accepted length {tau:.3f} < export.min_smoke_accept_length "
            f"{floor} (an untrained or broken draft); pass --force to export anyway"
        )
        return 3
    provenance = {
        "format": fmt,
        "source_checkpoint": str(ckpt),
        "target": recipe.target.model,
        "target_revision": recipe.target.revision,
        "smoke_accept_length": round(tau, 4),
        "forced": bool(tau < floor),
    }
    path = export_draft(draft, out, fmt, provenance)
    print(f"exported {draft.algorithm} ({fmt}) to {path}: validated names, shapes and config fields")
    return 0
