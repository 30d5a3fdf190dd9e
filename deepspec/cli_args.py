"""Command-line options shared by every recipe-driven sub-command.

Lives below every stage so that stage CLIs never import the top-level ``deepspec.cli`` (which imports them).
"""

from __future__ import annotations

import argparse


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every recipe-driven command shares: ``--config`` and repeated ``--set``."""
    parser.add_argument("-c", "--config", help="YAML recipe (see configs/); defaults apply when omitted")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set training.lr=3e-4 (repeatable; value parsed as YAML)",
    )
