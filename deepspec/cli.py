"""The ``deepspec`` command line: one entry point, one sub-command per pipeline stage.

Each sub-command lives in a small module exposing ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Those modules import only light things at import time, so ``deepspec --help``
stays fast; heavy libraries (torch, transformers) are imported inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Callable, Sequence

# sub-command -> module implementing it
COMMANDS: dict[str, str] = {
    "run": "deepspec.pipeline",
    "serve": "deepspec.eval.serve_cli",  # plain, or speculative (--draft) on the evaluation engine
    "regenerate": "deepspec.regenerate.cli",
    "features": "deepspec.features.cli",
    "train": "deepspec.train.cli",
    "eval": "deepspec.eval.cli",
    "benchmarks": "deepspec.eval.benchmarks_cli",
    "export": "deepspec.export.cli",
    "recipe": "deepspec.recipe_cli",
    "operator": "deepspec.operator.cli",
    "monitor": "deepspec.monitor.cli",
}


def _unavailable(name: str, module_name: str, error: BaseException) -> Callable[[argparse.Namespace], int]:
    """The ``run`` of a sub-command whose module failed to import: says why, exits 2."""
    missing = error.name if isinstance(error, ModuleNotFoundError) else None
    if missing and missing.partition(".")[0] != "deepspec":
        fix = (
            f"the package {missing!r} is not installed: install the extra this stage needs "
            "(pip install 'deepspec[train]', '[serve]' or '[operator]')"
        )
    else:
        fix = "this is a bug or a broken installation: reinstall deepspec, or report it with the traceback"
    cause = "".join(traceback.format_exception_only(type(error), error)).strip()

    def run(args: argparse.Namespace) -> int:
        print(
            f"error: `deepspec {name}` cannot run: importing {module_name} failed:\n  {cause}\n{fix}",
            file=sys.stderr,
        )
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    """The parser of every sub-command.

    A sub-command whose module fails to import (a missing optional dependency, or a bug) is still
    listed, marked unavailable with the cause; running it prints the cause and exits 2.
    """
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
        except Exception as e:
            # No option prefix: every argument (even -h) is taken as-is, so that the command
            # reaches its run() and reports the cause instead of an argument error.
            p = sub.add_parser(name, help=f"(unavailable: {type(e).__name__}: {e})", prefix_chars="\0")
            p.add_argument("ignored", nargs="*")
            p.set_defaults(_run=_unavailable(name, module_name, e))
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
