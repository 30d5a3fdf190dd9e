"""``deepspec features``: write the offline feature cache for a recipe (resumable, size-checked)."""

from __future__ import annotations

import argparse
from typing import Any

HELP = "capture target hidden states into a resumable feature cache (offline features)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepspec.cli_args import add_recipe_arguments

    add_recipe_arguments(parser)
    parser.add_argument("--out", help="cache directory or s3:// prefix (default: features.cache_path)")
    parser.add_argument(
        "--layers",
        default="recipe",
        help="'recipe' (draft.target_layer_ids or the algorithm default), 'union' (all three algorithms' "
        "defaults, one cache for all), or a comma list of 0-based layer ids",
    )
    parser.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per target forward")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--estimate-only", action="store_true", help="print the size estimate and exit")


def choose_layers(spec: str, recipe: Any, num_layers: int) -> list[int]:
    from deepspec.target_model.model import default_layer_ids

    if spec == "recipe":
        return list(recipe.draft.target_layer_ids or default_layer_ids(num_layers, recipe.draft.algorithm))
    if spec == "union":
        ids = set(default_layer_ids(num_layers, "eagle3")) | set(default_layer_ids(num_layers, "dflash"))
        return sorted(ids)
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(
            f"--layers {spec!r}: expected 'recipe', 'union' or a comma list of integers"
        ) from None


def run(args: argparse.Namespace) -> int:
    import logging

    from transformers import AutoConfig, AutoTokenizer

    from deepspec.config import load_recipe
    from deepspec.data.sequences import load_sequences
    from deepspec.devices import pick_device
    from deepspec.features.cache import CacheError, FeatureCacheWriter, cache_identity, estimate_summary
    from deepspec.layout import RunLayout
    from deepspec.target_model.files import resolve_model_path
    from deepspec.target_model.model import TargetModel

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    recipe = load_recipe(args.config, args.overrides)
    out = args.out or recipe.features.cache_path
    if not out:
        raise SystemExit("no cache destination: pass --out or set features.cache_path in the recipe")
    out = RunLayout.from_recipe(recipe).resolve(out)
    path = resolve_model_path(recipe.target.model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=recipe.target.trust_remote_code)
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=recipe.target.trust_remote_code)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layer_ids = choose_layers(args.layers, recipe, int(cfg.num_hidden_layers))
    sequences = load_sequences(recipe, tokenizer, progress=True)
    n_tokens = sum(int(s.input_ids.numel()) for s in sequences)
    print(
        f"feature cache estimate: {estimate_summary(n_tokens, int(cfg.hidden_size), len(layer_ids), recipe.features.storage_dtype)}"
    )
    if args.estimate_only:
        return 0
    device = pick_device(args.device)
    target = TargetModel.from_pretrained(
        recipe.target.model, layer_ids, recipe.draft.algorithm, device=device,
        dtype=None if recipe.target.dtype == "auto" else recipe.target.dtype,
        trust_remote_code=recipe.target.trust_remote_code,
    )  # fmt: skip
    batch_tokens = args.batch_tokens or (32768 if device.type == "cuda" else 4096)
    writer = FeatureCacheWriter(
        out, target, sequences, cache_identity(recipe, target, tokenizer),
        storage_dtype=recipe.features.storage_dtype, shard_tokens=recipe.features.shard_tokens,
        batch_tokens=batch_tokens, endpoint_url=recipe.storage.s3_endpoint_url,
    )  # fmt: skip
    try:
        manifest = writer.run(progress=True)
    except CacheError as e:
        print(f"error: {e}")
        return 2
    print(
        f"feature cache {out}: {manifest['num_sequences']} sequences, {manifest['num_tokens']:,} tokens, "
        f"{manifest['num_shards']} shards, layers {manifest['layer_ids']}, content hash {manifest['content_hash'][:16]}"
    )
    return 0
