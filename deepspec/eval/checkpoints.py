"""Locating a draft checkpoint and loading the target + drafter pair it needs (eval and export)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepspec.config import Recipe
    from deepspec.models.common import DraftModel
    from deepspec.target_model.model import TargetModel


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``step_<N>`` folder as is, or a training output folder (or its ``latest`` file) through ``latest``."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    latest = p if p.is_file() and p.name == "latest" else p / "latest"
    p = latest.parent
    if latest.is_file():
        step = p / latest.read_text(encoding="utf-8").strip()
        if (step / "config.json").is_file():
            return step
        raise FileNotFoundError(f"{latest} points to {step}, which holds no config.json")
    raise FileNotFoundError(
        f"{p} is not a checkpoint: expected config.json + model.safetensors, or a 'latest' file naming step_<N>"
    )


def local_path(recipe: Recipe, path: str | Path) -> Path:
    """A recipe path: relative ones resolve against a local ``storage.root``."""
    text = str(path)
    root = recipe.storage.root
    if text.startswith("s3://") or root.startswith("s3://"):
        raise ValueError(
            f"{text}: eval/export read and write local paths; sync s3:// storage to a local folder first "
            "(or mount the volume) and pass that path"
        )
    p = Path(text)
    return p if p.is_absolute() or root in ("", ".") else Path(root) / p


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
    recipe: Recipe, checkpoint: str | Path, device: str | None = None
) -> tuple[TargetModel, DraftModel, Path]:
    """Load the recipe's target with the checkpoint's layer ids, then the draft on it."""
    from deepspec.models import load_draft
    from deepspec.target_model.model import TargetModel

    ckpt = resolve_checkpoint(local_path(recipe, checkpoint))
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
    return target, draft, ckpt


def load_tokenizer(target: TargetModel) -> Any:
    from transformers import AutoTokenizer

    path = getattr(target, "name_or_path", None) or getattr(target.config, "_name_or_path", None)
    if not path:
        raise ValueError("the target has no local path to load its tokenizer from")
    return AutoTokenizer.from_pretrained(path)
