"""Locating a draft checkpoint and loading the target + drafter pair it needs (eval and export)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepspec.layout import LATEST

if TYPE_CHECKING:
    import torch

    from deepspec.config import Recipe
    from deepspec.layout import RunLayout
    from deepspec.models.draft import DraftModel
    from deepspec.target_model.model import TargetModel


CHECKPOINT_FILES = ("config.json", "model.safetensors")  # what a draft needs to load
SELECTED = "selected"  # pointer written by `deepspec eval --select` beside `latest` (same format)
POINTERS = (LATEST, SELECTED)


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``step_<N>`` folder as is, a training output folder through ``latest``, or a pointer file
    (``latest`` / ``selected``) through the step it names."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    latest = p if p.is_file() and p.name in POINTERS else p / LATEST
    p = latest.parent
    if latest.is_file():
        step = p / latest.read_text(encoding="utf-8").strip()
        if (step / "config.json").is_file():
            return step
        raise FileNotFoundError(f"{latest} points to {step}, which holds no config.json")
    raise FileNotFoundError(
        f"{p} is not a checkpoint: expected config.json + model.safetensors, or a 'latest' file naming step_<N>"
    )


def locate_checkpoint(layout: RunLayout, checkpoint: str | Path) -> tuple[str, Path]:
    """(where the step checkpoint lives, a local folder holding it) for a ``--checkpoint`` argument.

    Relative paths are outputs of the run (under ``storage.root``). Local: :func:`resolve_checkpoint`.
    ``s3://``: the step folder itself, a training output prefix or its ``latest`` object; only the two
    files a draft needs (``config.json``, ``model.safetensors``) are downloaded, never optimizer states.
    """
    from deepspec.storage import S3Store, is_s3, join

    text = layout.resolve(str(checkpoint))
    if not is_s3(text):
        step = resolve_checkpoint(text)
        return str(step), step
    base = text.rstrip("/")
    pointer = LATEST
    for name in POINTERS:
        if base.endswith("/" + name):
            base, pointer = base[: -len(name) - 1], name
    store = S3Store(base, layout.endpoint_url)
    if not store.exists("config.json"):
        if not store.exists(pointer):
            raise FileNotFoundError(
                f"{text} is not a checkpoint: expected config.json + model.safetensors, or a 'latest' object "
                "naming step_<N>"
            )
        base = join(base, store.read_text(pointer).strip())
    files = [layout.local_input(join(base, name)) for name in CHECKPOINT_FILES]
    return base, files[0].parent


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {e}") from e


def checkpoint_layer_ids(cfg: dict[str, Any]) -> list[int] | None:
    """The 0-based target layers a checkpoint was trained on (deepspec section, then serving fields)."""
    ds = cfg.get("deepspec") or {}
    for value in (
        ds.get("target_layer_ids"),
        cfg.get("target_layer_ids"),
        (cfg.get("dflash_config") or {}).get("target_layer_ids"),
        (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids"),
    ):
        if value:
            return [int(i) for i in value]
    return None


def checkpoint_algorithm(cfg: dict[str, Any], default: str) -> str:
    return str((cfg.get("deepspec") or {}).get("algorithm") or default)


def load_target_and_draft(
    recipe: Recipe, checkpoint: str | Path, device: str | torch.device | None = None
) -> tuple[TargetModel, DraftModel, str]:
    """Load the recipe's target with the checkpoint's layer ids, then the draft on it.

    Returns the step checkpoint's location too (a local path or an ``s3://`` URI, for reports).
    """
    from deepspec.layout import RunLayout
    from deepspec.models import load_draft
    from deepspec.target_model.model import TargetModel

    where, ckpt = locate_checkpoint(RunLayout.from_recipe(recipe), checkpoint)
    cfg = read_checkpoint_config(ckpt)
    algorithm = checkpoint_algorithm(cfg, recipe.draft.algorithm)
    layer_ids = checkpoint_layer_ids(cfg) or recipe.draft.target_layer_ids
    target = TargetModel.from_pretrained(
        recipe.target.model,
        layer_ids,
        algorithm,
        device=device,
        dtype=recipe.target.dtype,
        trust_remote_code=recipe.target.trust_remote_code,
    )
    draft = load_draft(ckpt, target)
    draft.eval()
    return target, draft, where


def load_tokenizer(target: TargetModel) -> Any:
    from transformers import AutoTokenizer

    path = getattr(target, "name_or_path", None) or getattr(target.config, "_name_or_path", None)
    if not path:
        raise ValueError("the target has no local path to load its tokenizer from")
    return AutoTokenizer.from_pretrained(path)
