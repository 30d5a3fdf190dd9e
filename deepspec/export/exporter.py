"""Writing and validating serving checkpoints (``config.json`` + ``model.safetensors``).

:func:`export_draft` converts a draft, writes it to a temporary folder, reloads it with
:func:`validate_export` (names, shapes, dtypes, finiteness, config fields) and only then moves it into
place, so a broken export never reaches the output path. :func:`smoke_accept_length` runs a few short
greedy prompts through the engine; an export whose accepted length is below the recipe's
``export.min_smoke_accept_length`` is refused unless forced (a draft that silently loads with random
weights gives tau = 1.0 in production).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deepspec.export.formats import ExportError, ExportSpec, expected_spec, serving_config, serving_tensors

if TYPE_CHECKING:
    from deepspec.models.common import DraftModel
    from deepspec.target_model.model import TargetModel

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
_KIND_DTYPES = {"int64": (torch.int64,), "bool": (torch.bool,)}


def validate_export(
    path: str | Path, algorithm: str, fmt: str, spec: ExportSpec | None = None
) -> dict[str, Any]:
    """Reload an export and check it against its format; raise :class:`ExportError` listing every problem."""
    from safetensors import safe_open

    p = Path(path)
    problems: list[str] = []
    if not (p / CONFIG).is_file() or not (p / WEIGHTS).is_file():
        raise ExportError(f"{p}: an export needs {CONFIG} and {WEIGHTS}")
    cfg = json.loads((p / CONFIG).read_text(encoding="utf-8"))
    spec = spec or expected_spec(cfg, algorithm, fmt)
    if cfg.get("architectures") != [spec.architecture]:
        problems.append(f"architectures is {cfg.get('architectures')}, expected [{spec.architecture!r}]")
    for key, want in spec.config.items():
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node != want:
            problems.append(f"config {key} is {node!r}, expected {want!r}")
    with safe_open(str(p / WEIGHTS), framework="pt") as f:
        names = set(f.keys())
        for name in sorted(set(spec.tensors) - names):
            problems.append(f"missing tensor {name} {tuple(spec.tensors[name].shape)}")
        for name in sorted(names - set(spec.tensors)):
            problems.append(f"unexpected tensor {name} (misnamed? {spec.architecture} does not load it)")
        for name in sorted(names & set(spec.tensors)):
            t = f.get_tensor(name)
            want = spec.tensors[name]
            if tuple(t.shape) != want.shape:
                problems.append(f"tensor {name} has shape {tuple(t.shape)}, expected {want.shape}")
            if want.kind == "float":
                if not t.is_floating_point():
                    problems.append(f"tensor {name} has dtype {t.dtype}, expected a float dtype")
                elif not bool(torch.isfinite(t.float()).all()):
                    problems.append(f"tensor {name} holds NaN/inf values")
            elif t.dtype not in _KIND_DTYPES[want.kind]:
                problems.append(f"tensor {name} has dtype {t.dtype}, expected {want.kind}")
    if problems:
        raise ExportError(f"export {p} ({algorithm}, {fmt}) is invalid:\n  " + "\n  ".join(problems))
    return cfg


@torch.no_grad()
def smoke_accept_length(
    target: TargetModel,
    draft: DraftModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    num_proposals: int = 7,
    stop_token_ids: tuple[int, ...] = (),
) -> float:
    """Accepted length tau of a few short greedy generations."""
    from deepspec.eval.engine import EngineConfig, SpeculativeEngine
    from deepspec.eval.metrics import AcceptanceStats

    cfg = EngineConfig(
        num_proposals=num_proposals,
        temperature=0.0,
        max_new_tokens=max_new_tokens,
        stop_token_ids=stop_token_ids,
    )
    engine = SpeculativeEngine(target, draft.as_drafter(target), cfg)
    stats = AcceptanceStats()
    for ids in prompts:
        stats += engine.generate(list(ids)).stats
    return stats.tau


def export_draft(
    draft: DraftModel,
    out_dir: str | Path,
    fmt: str = "sglang",
    provenance: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Convert, write to ``<out>.tmp``, validate by reloading, then move into ``out_dir``."""
    from safetensors.torch import save_file

    if fmt not in ("sglang", "vllm"):
        raise ExportError(f"unknown export format {fmt!r}; choose sglang or vllm")
    algorithm = draft.algorithm
    cfg = serving_config(draft.draft_config(), algorithm, fmt)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    if provenance:
        cfg.setdefault("deepspec", {})
        cfg["deepspec"] = {**cfg["deepspec"], "export": provenance}
    spec = expected_spec(cfg, algorithm, fmt)
    state = serving_tensors(draft.trainable_state_dict(), spec)
    tensors = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in state.items()
    }
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        validate_export(tmp, algorithm, fmt, spec)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
