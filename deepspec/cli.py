"""The ``deepspec`` command line: one entry point, one sub-command per pipeline stage.

Each sub-command lives in a small module exposing ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Those modules import only light things at import time, so ``deepspec --help``
stays fast; heavy libraries (torch, transformers) are imported inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# sub-command -> module implementing it
COMMANDS: dict[str, str] = {
    "run": "deepspec.pipeline",
    "serve": "deepspec.serve.cli",
    "regenerate": "deepspec.regenerate.cli",
    "features": "deepspec.features.cli",
    "train": "deepspec.train.cli",
    "eval": "deepspec.eval.cli",
    "benchmarks": "deepspec.eval.benchmarks_cli",
    "export": "deepspec.export.cli",
    "recipe": "deepspec.recipe_cli",
    "operator": "deepspec.operator.cli",
}


def build_parser() -> argparse.ArgumentParser:
    from deepspec import __version__

    parser = argparse.ArgumentParser(
        prog="deepspec",
        description="Train, evaluate, export and monitor speculative-decoding draft models "
        "(Eagle3, DFlash, DSpark). Every stage is one sub-command; `deepspec run` chains them.",
    )
    parser.add_argument("--version", action="version", version=f"deepspec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:  # a stage whose optional extra is not installed
            if e.name and e.name.startswith("deepspec"):
                continue
            sub.add_parser(name, help=f"(unavailable: missing dependency {e.name})")
            continue
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from deepspec.config import RecipeError

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is kept, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
