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
    parser.add_argument("--checkpoint", help="step_<N> folder or training output dir (latest)")
    parser.add_argument(
        "--check",
        nargs=2,
        metavar=("ENGINE", "DIR"),
        help="only check an export folder against sglang's or vllm's rules (no recipe or checkpoint needed)",
    )
    parser.add_argument(
        "--format", choices=["sglang", "vllm"], help="serving engine (default: export.format)"
    )
    parser.add_argument("--output", help="export directory (default: export.output_dir)")
    parser.add_argument(
        "--force", action="store_true", help="export even when the smoke accepted length is low"
    )
    parser.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--smoke-tokens", type=int, default=32, help="new tokens per smoke prompt")


class _SmokeRefused(RuntimeError):
    pass


def check(engine: str, path: str) -> int:
    """``deepspec export --check ENGINE DIR``: 0 when every rule of the engine passes, else 4."""
    from deepspec.export.engines import ConformanceError, check_export

    try:
        violations = check_export(path, engine)
    except ConformanceError as e:
        print(f"error: {e}")
        return 4
    for v in violations:
        print(f"FAIL {v}")
    if violations:
        print(
            f"{path}: {len(violations)} {engine} rule(s) broken: the engine would refuse or misread this draft"
        )
        return 4
    print(f"{path}: passes every {engine} rule")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.check:
        return check(*args.check)
    if not args.checkpoint:
        print("error: deepspec export needs --checkpoint (or --check ENGINE DIR)")
        return 2
    from deepspec.config import load_recipe
    from deepspec.data.template import render_prompt, template_kwargs
    from deepspec.eval.checkpoints import load_target_and_draft, load_tokenizer
    from deepspec.eval.runner import stop_token_ids
    from deepspec.export.exporter import export_draft, smoke_test
    from deepspec.layout import RunLayout
    from deepspec.target_model.files import resolve_model_path

    recipe = load_recipe(args.config, args.overrides)
    fmt = args.format or recipe.export.format
    force = args.force or recipe.export.force
    layout = RunLayout.from_recipe(recipe)
    destination = layout.resolve(args.output) if args.output else layout.export_dir
    target, draft, ckpt = load_target_and_draft(recipe, args.checkpoint, args.device)
    tokenizer = load_tokenizer(target)
    kwargs = template_kwargs(recipe.regeneration, thinking=recipe.evaluation.thinking)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": p}], kwargs) for p in SMOKE_PROMPTS]
    floor = recipe.export.min_smoke_accept_length

    def gate(folder: Path) -> dict:
        result = smoke_test(
            target, draft, folder, fmt, prompts,
            max_new_tokens=args.smoke_tokens,
            num_proposals=recipe.evaluation.num_proposals,
            stop_token_ids=stop_token_ids(tokenizer, target.config),
        )  # fmt: skip
        print(result.describe(floor))
        if not result.passed(floor) and not force:
            raise _SmokeRefused(result.describe(floor))
        return {
            "smoke_accept_length": round(result.accept_length, 4),
            "smoke_engine_agreement": round(result.agreement, 4),
            "forced": not result.passed(floor),
        }

    provenance = {
        "format": fmt,
        "source_checkpoint": str(ckpt),
        "target": recipe.target.model,
        "target_revision": recipe.target.revision,
    }
    try:
        # A local folder in every case; for an s3:// destination it is uploaded once the export passed.
        with layout.local_output(destination) as out:
            path = export_draft(
                draft,
                out,
                fmt,
                provenance,
                gate=gate,
                # the engines load an HF id or folder; deepspec's GGUF targets (a .gguf file, the SmolLM2
                # alias) are served from the safetensors folder deepspec converted them into (a stat of the
                # GGUF file names the cached folder: no second conversion)
                target_model=resolve_model_path(recipe.target.model),
                served_from=destination,
            )
            readme = (path / "README.md").read_text(encoding="utf-8")
    except _SmokeRefused:
        print(
            f"error: refusing to export {ckpt}: below export.min_smoke_accept_length {floor} or the {fmt} "
            f"drafter disagrees with ours (an untrained or broken draft); pass --force to export anyway"
        )
        return 3
    print(f"exported {draft.algorithm} ({fmt}) to {destination}: passes every {fmt} rule. Serve it with:")
    print("  " + readme.split("```\n")[1].strip())
    return 0
