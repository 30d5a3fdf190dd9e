"""``deepspec train``: train a draft (Eagle3 / DFlash / DSpark); run under torchrun for several GPUs."""

from __future__ import annotations

import argparse

HELP = "train a draft model (torchrun-compatible; resumes from <output_dir>/latest)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepspec.cli_args import add_recipe_arguments

    add_recipe_arguments(parser)
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing <output_dir>/latest")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import json
    import logging

    from deepspec.config import load_recipe
    from deepspec.train.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    recipe = load_recipe(args.config, args.overrides)
    trainer = Trainer(recipe, device=args.device, resume=not args.no_resume, progress=not args.no_progress)
    try:
        final = trainer.train()
    finally:
        trainer.close()
    if trainer.dist.is_main:
        shown = {k: v for k, v in final.items() if k != "acceptance"}
        print(json.dumps({"step": trainer.step, "output_dir": trainer.layout.checkpoints, **shown}))
    return 0
