"""`deepspec run`: the whole pipeline in one command, stage after stage.

Each stage is exactly the sub-command the Kubernetes operator runs in a Job (``deepspec regenerate``,
``features``, ``train``, ``eval``, ``export``), called in-process with the same recipe and overrides,
so there is one way to do each thing. Every stage is resumable, so re-running ``deepspec run`` after
an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import time

HELP = "run the whole pipeline (regenerate -> [features] -> train -> eval -> export) from one recipe"
STAGES = ("regenerate", "features", "train", "eval", "export")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepspec.cli_args import add_recipe_arguments

    add_recipe_arguments(parser)
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated subset of {','.join(STAGES)} (default: all; 'features' runs only in offline mode)",
    )


def stage_commands(
    recipe_path: str | None, overrides: list[str], stages: list[str], recipe
) -> list[list[str]]:
    """The sub-command argument lists ``deepspec run`` executes, in order."""
    from deepspec.layout import RunLayout

    common = (["-c", recipe_path] if recipe_path else []) + [a for o in overrides for a in ("--set", o)]
    checkpoint = RunLayout.from_recipe(recipe).checkpoint()
    commands = []
    for stage in STAGES:
        if stage not in stages:
            continue
        if stage == "features" and recipe.features.mode != "offline":
            continue
        extra = ["--checkpoint", checkpoint] if stage in ("eval", "export") else []
        commands.append([stage, *common, *extra])
    return commands


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from deepspec.cli import main
    from deepspec.config import load_recipe

    console = Console(stderr=True)
    recipe = load_recipe(args.config, args.overrides)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        console.print(
            f"[red]error:[/] unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}"
        )
        return 2
    timings: list[tuple[str, float, int]] = []
    for argv in stage_commands(args.config, args.overrides, stages, recipe):
        console.rule(f"[bold]deepspec {argv[0]}")
        t0 = time.perf_counter()
        rc = main(argv)
        timings.append((argv[0], time.perf_counter() - t0, rc))
        if rc != 0:
            console.print(f"[red]stage {argv[0]} failed (exit {rc}); fix the cause and re-run to resume[/]")
            return rc
    console.rule("[bold]done")
    for name, seconds, _ in timings:
        console.print(f"  {name:<11} {seconds:8.1f} s")
    return 0
