"""`deepspec recipe`: validate recipes, show the resolved recipe, print its JSON schema."""

from __future__ import annotations

import argparse
import json

HELP = "validate / show a recipe, or print the recipe JSON schema"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepspec.cli_args import add_recipe_arguments

    parser.add_argument("action", choices=["show", "validate", "schema"], help="what to do")
    parser.add_argument("files", nargs="*", help="recipes to validate (validate only)")
    add_recipe_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import yaml

    from deepspec.config import load_recipe, recipe_json_schema

    if args.action == "schema":
        print(json.dumps(recipe_json_schema(), indent=2))
    elif args.action == "show":
        from deepspec.layout import RunLayout

        recipe = load_recipe(args.config, args.overrides)
        print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), end="")
        print("# where this run's artefacts go (storage.root applied):")
        for name, uri in RunLayout.from_recipe(recipe).all_outputs().items():
            print(f"#   {name:<12} {uri}")
    else:
        for f in args.files or ([args.config] if args.config else []):
            load_recipe(f, args.overrides)
            print(f"ok  {f}")
    return 0
