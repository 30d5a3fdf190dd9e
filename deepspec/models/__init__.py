"""Draft models (Eagle3, DFlash, DSpark) and their inference protocol (``base``).

``build_draft(cfg, target)`` makes a fresh draft for a :class:`~deepspec.target_model.model.TargetModel`;
``load_draft(dir, target)`` rebuilds one from a checkpoint directory (``config.json`` + ``model.safetensors``).
Heavy imports stay inside the functions so that ``import deepspec.models.base`` is cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepspec.config import DraftModelConfig
    from deepspec.models.draft import DraftBatch, DraftModel, DraftOutput
    from deepspec.target_model.model import TargetModel

__all__ = ["DraftBatch", "DraftModel", "DraftOutput", "build_draft", "load_draft"]


def build_draft(
    cfg: DraftModelConfig,
    target: TargetModel,
    *,
    mask_token_id: int | None = None,
) -> DraftModel:
    """A freshly initialised draft of ``cfg.algorithm`` sized from ``target`` (fp32 on the target's device).

    Eagle3 with a reduced ``draft_vocab_size`` holds a placeholder mapping (the first ids) until
    :meth:`~deepspec.models.eagle3.Eagle3Draft.set_vocab_mapping` installs the one
    :func:`~deepspec.models.eagle3.build_vocab_mapping` makes from the data's token counts.
    mask_token_id: DFlash/DSpark reserved mask token (default: see ``dflash.default_mask_token_id``).
    """
    if cfg.algorithm == "eagle3":
        from deepspec.models.eagle3 import Eagle3Draft

        return Eagle3Draft(cfg, target)
    if cfg.algorithm == "dflash":
        from deepspec.models.dflash import DFlashDraft

        return DFlashDraft(cfg, target, mask_token_id=mask_token_id)
    if cfg.algorithm == "dspark":
        from deepspec.models.dspark import DSparkDraft

        return DSparkDraft(cfg, target, mask_token_id=mask_token_id)
    raise ValueError(f"unknown draft algorithm {cfg.algorithm!r}; expected eagle3, dflash or dspark")


def read_draft_config(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {checkpoint_dir}: not a deepspec draft checkpoint")
    data = json.loads(path.read_text(encoding="utf-8"))
    if "deepspec" not in data or "draft" not in data["deepspec"]:
        raise ValueError(
            f"{path} lacks the 'deepspec.draft' section written by draft_config(); cannot rebuild"
        )
    return data


def load_draft(checkpoint_dir: str | Path, target: TargetModel) -> DraftModel:
    """Rebuild a draft from ``config.json`` + ``model.safetensors`` and check every tensor name and shape."""
    from safetensors.torch import load_file

    from deepspec.config import draft_model_config

    data = read_draft_config(checkpoint_dir)
    section = data["deepspec"]
    cfg = draft_model_config(section["draft"])
    if list(section.get("target_layer_ids", target.layer_ids)) != list(target.layer_ids):
        raise ValueError(
            f"draft in {checkpoint_dir} was trained on target layers {section['target_layer_ids']}, but the "
            f"target captures {target.layer_ids}: load the target with those layer ids"
        )
    for key, have in (("target_hidden_size", target.hidden_size), ("target_vocab_size", target.vocab_size)):
        if key in section and int(section[key]) != int(have):
            raise ValueError(f"draft in {checkpoint_dir} expects {key}={section[key]}, the target has {have}")
    model = build_draft(cfg, target, mask_token_id=section.get("mask_token_id"))
    trained_as = section.get("slot_convention")
    if cfg.algorithm == "dflash" and trained_as != model.slot_convention:  # type: ignore[attr-defined]
        raise ValueError(
            f"draft in {checkpoint_dir} was trained with slot convention {trained_as!r} (before issue 10 DFlash "
            f"slot k predicted anchor+k+1); this DFlash runs {model.slot_convention!r} as SGLang and vLLM do: "
            f"retrain it"
        )
    weights_path = Path(checkpoint_dir) / "model.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(f"no model.safetensors in {checkpoint_dir}")
    state = load_file(str(weights_path), device=str(target.lm_head.weight.device))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"checkpoint {weights_path} does not match a {cfg.algorithm} draft: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, wrong shape {bad_shape[:8]}"
        )
    model.load_state_dict(state, strict=True)
    return model


def __getattr__(name: str) -> Any:  # lazy re-exports of the shared types
    if name in ("DraftBatch", "DraftOutput", "DraftModel"):
        from deepspec.models import draft

        return getattr(draft, name)
    raise AttributeError(name)
