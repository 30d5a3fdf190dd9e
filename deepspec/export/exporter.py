"""Writing serving checkpoints (``config.json`` + ``model.safetensors`` + ``README.md``) and gating them.

:func:`export_draft` converts a draft for one engine, writes it to a temporary folder, checks it against
that engine's rules (:mod:`.engines`), runs an optional gate on the written folder, and only then moves it
into place, so a broken export never reaches the output path. :func:`smoke_test` is the gate of
``deepspec export``: a few short greedy generations drafted by the :class:`.EngineDrafter`, which reads
only the written folder the way the engine would, compared round by round with our own drafter. An export
whose accepted length is below the floor, or whose engine proposals differ from ours, is refused (a draft
that silently loads with random or misaligned weights gives accepted length 1.0 in production).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deepspec.export.engines import CONFIG, WEIGHTS, ConformanceError, require_conformance
from deepspec.export.formats import FP32_TENSORS, ExportError, serving_config, serving_tensors
from deepspec.export.launch import launch_lines, readme

if TYPE_CHECKING:
    from deepspec.models.base import Proposal, SpeculativeDrafter
    from deepspec.models.draft import DraftModel
    from deepspec.target_model.model import TargetModel

__all__ = ["ExportError", "SmokeResult", "export_draft", "smoke_test", "validate_export", "write_export"]


def validate_export(path: str | Path, engine: str) -> dict[str, Any]:
    """Check an export folder against ``engine``'s rules and for NaN/inf weights; returns its config."""
    from safetensors.torch import load_file

    require_conformance(path, engine)
    bad = [k for k, v in load_file(str(Path(path) / WEIGHTS)).items() if v.is_floating_point() and not
           bool(torch.isfinite(v.float()).all())]  # fmt: skip
    if bad:
        raise ExportError(f"export {path}: tensors {bad[:8]} hold NaN/inf values")
    return json.loads((Path(path) / CONFIG).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# The smoke gate: accepted length through the engine-semantics drafter, proposals compared with ours
# --------------------------------------------------------------------------------------------------


@dataclass
class SmokeResult:
    engine: str
    accept_length: float  # through the engine-semantics drafter
    rounds: int
    agreement: float  # fraction of rounds whose engine proposals equal our drafter's
    error: str | None = None  # the engine drafter could not load the export

    def passed(self, floor: float) -> bool:
        return self.error is None and self.accept_length >= floor and self.agreement >= 1.0

    def describe(self, floor: float) -> str:
        if self.error:
            return f"smoke test ({self.engine}): the engine would not load the export: {self.error}"
        return (
            f"smoke test ({self.engine} semantics): accepted length {self.accept_length:.3f} over "
            f"{self.rounds} greedy rounds (floor {floor}); engine proposals equal ours in "
            f"{self.agreement:.1%} of rounds"
        )


class _FeatureColumns:
    """Feeds a drafter the columns of its own layers out of features captured for a union of layers."""

    def __init__(self, drafter: SpeculativeDrafter, union: list[int], wanted: list[int], hidden: int):
        self.drafter = drafter
        self.index = torch.tensor([union.index(i) for i in wanted])
        self.hidden = hidden

    def extend(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        per_layer = features.view(features.shape[0], -1, self.hidden)
        self.drafter.extend(tokens, per_layer[:, self.index.to(features.device)].flatten(1))


class _ComparingDrafter:
    """Drafts with the engine drafter and asks ours for the same round, counting equal proposals."""

    def __init__(self, engine: _FeatureColumns, ours: _FeatureColumns):
        self.engine, self.ours = engine, ours
        self.rounds = self.agreed = 0

    def reset(self) -> None:
        self.engine.drafter.reset()
        self.ours.drafter.reset()

    def extend(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        self.engine.extend(tokens, features)
        self.ours.extend(tokens, features)

    def propose(self, anchor: int, num_proposals: int, temperature: float, generator=None) -> Proposal:
        theirs = self.engine.drafter.propose(anchor, num_proposals, temperature, generator)
        mine = self.ours.drafter.propose(anchor, num_proposals, temperature, generator)
        self.rounds += 1
        self.agreed += int(torch.equal(theirs.tokens.cpu(), mine.tokens.cpu()))
        return theirs


def rounded_twin(draft: DraftModel, dtype: torch.dtype) -> DraftModel:
    """A copy of ``draft`` (sharing its frozen target) whose weights went through ``dtype``, as exported."""
    twin = copy.deepcopy(draft, memo={id(draft.target): draft.target})
    with torch.no_grad():
        for name, t in twin.state_dict().items():
            if t.is_floating_point() and not FP32_TENSORS.search(name):
                t.copy_(t.to(dtype).to(t.dtype))
    return twin


@torch.no_grad()
def smoke_test(
    target: TargetModel,
    draft: DraftModel,
    export_dir: str | Path,
    engine: str,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    num_proposals: int = 7,
    stop_token_ids: tuple[int, ...] = (),
    dtype: torch.dtype = torch.bfloat16,
) -> SmokeResult:
    """Greedy generations drafted through the export the way ``engine`` would, compared with ``draft``."""
    from deepspec.eval.engine import EngineConfig, SpeculativeEngine
    from deepspec.eval.metrics import AcceptanceStats
    from deepspec.export.engine_drafter import EngineDrafter
    from deepspec.target_model.model import TargetModel

    try:
        engine_drafter = EngineDrafter(export_dir, engine, target)
    except ConformanceError as e:
        return SmokeResult(engine, 1.0, 0, 0.0, error=str(e))
    ours = list(draft.target_layer_ids)
    theirs = engine_drafter.capture_layer_ids
    union = sorted(set(ours) | set(theirs))
    view = TargetModel.from_model(target.model, union)
    h = int(target.hidden_size)
    comparing = _ComparingDrafter(
        _FeatureColumns(engine_drafter, union, theirs, h),
        _FeatureColumns(rounded_twin(draft, dtype).eval().as_drafter(), union, ours, h),
    )
    cfg = EngineConfig(
        num_proposals=num_proposals,
        temperature=0.0,
        max_new_tokens=max_new_tokens,
        stop_token_ids=stop_token_ids,
    )
    run = SpeculativeEngine(view, comparing, cfg)
    stats = AcceptanceStats()
    for ids in prompts:
        stats += run.generate(list(ids)).stats
    agreement = comparing.agreed / max(comparing.rounds, 1)
    return SmokeResult(engine, stats.tau, comparing.rounds, agreement)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def write_export(
    draft: DraftModel, folder: str | Path, fmt: str, dtype: torch.dtype = torch.bfloat16
) -> dict:
    """Write ``config.json`` + ``model.safetensors`` for engine ``fmt`` into ``folder``, unchecked."""
    from safetensors.torch import save_file

    algorithm = draft.algorithm
    cfg = serving_config(draft.draft_config(), algorithm, fmt)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    state = serving_tensors(draft.trainable_state_dict(), cfg, algorithm)
    tensors = {
        k: (v.detach().to("cpu", torch.float32 if FP32_TENSORS.search(k) else dtype) if v.is_floating_point()
            else v.detach().cpu()).contiguous()
        for k, v in state.items()
    }  # fmt: skip
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    (path / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return cfg


def export_draft(
    draft: DraftModel,
    out_dir: str | Path,
    fmt: str = "sglang",
    provenance: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    gate: Callable[[Path], dict[str, Any]] | None = None,
    target_model: str = "TARGET",
    served_from: str | None = None,
) -> Path:
    """Convert for engine ``fmt``, write to a temporary folder, check, gate, then move into ``out_dir``.

    gate: called with the written folder; returns provenance entries (e.g. the smoke result) and raises to
    refuse the export. target_model: what the launch line in README.md serves as the target. served_from:
    where the engine will read the draft when that is not ``out_dir`` (an ``s3://`` export is written in a
    local folder, then uploaded).
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        cfg = write_export(draft, tmp, fmt, dtype)
        validate_export(tmp, fmt)
        record = dict(provenance or {})
        if gate is not None:
            record.update(gate(tmp))
        if record:
            cfg["deepspec"] = {**cfg.get("deepspec", {}), "export": record}
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        line = launch_lines(cfg, fmt, served_from or str(out.resolve()), target_model)
        (tmp / "README.md").write_text(readme(cfg, fmt, line), encoding="utf-8")
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
