"""Checkpoint selection by *measured* accepted length on held-out training prompts (``deepspec eval --select``).

The training loss is a poor proxy for what serving sees (a draft can lower its loss on easy tokens while
its first-slot acceptance stalls), so the checkpoint to evaluate and export is chosen by decoding:

1. the held-out slice: the ``data.holdout`` records of the regenerated data that training never saw
   (:func:`deepspec.data.sequences.split_holdout`), first user turn of each, capped by ``--max-prompts``;
2. every kept ``step_<N>`` of ``training.output_dir`` (keep several: ``training.keep_last``) decodes
   those prompts with the speculative engine under the recipe's evaluation protocol (temperature,
   proposals, max new tokens, thinking), with one per-prompt seed shared by all checkpoints, so the
   candidates see the same prompts and the same random numbers;
3. the highest accepted length wins (ties: the later step); ``<output_dir>/selected`` names it (a
   pointer file like ``latest``: ``deepspec eval --checkpoint <output_dir>/selected`` evaluates it) and
   ``<output_dir>/selection.json`` records every candidate (accepted length, per-position acceptance,
   and the logged training loss at that step when ``metrics.jsonl`` is beside the checkpoints).

The target is loaded once; only the draft is reloaded per checkpoint. Paths go through the run
layout, so a ``storage.root`` on S3 works the same way.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deepspec.config import Recipe
from deepspec.eval.benchmarks import BenchmarkPrompt
from deepspec.eval.checkpoints import (
    SELECTED,
    checkpoint_layer_ids,
    locate_checkpoint,
    read_checkpoint_config,
)
from deepspec.eval.evaluator import EvalOptions, EvalSetupError, Evaluator
from deepspec.layout import LATEST, RunLayout
from deepspec.storage import is_s3, join, open_store

HOLDOUT = "holdout"  # the benchmark name the held-out prompts are decoded under
SELECTION_FILE = "selection.json"
_STEP_WEIGHTS = re.compile(r"^step_(\d+)/model\.safetensors$")


class SelectionError(EvalSetupError):
    """Selection cannot run (no held-out prompts, no checkpoints); the message says what to do."""


@dataclass
class Candidate:
    """One checkpoint's measured figures on the held-out prompts."""

    step: int
    checkpoint: str
    accept_length: float
    acceptance_ratio: float
    rounds: int
    conditional_acceptance: list[float]
    train_loss: float | None = None  # logged loss at this step (for contrast; never used to choose)


@dataclass
class Selection:
    selected: Candidate
    candidates: list[Candidate]
    prompts: int
    pointer: str  # where the `selected` pointer was written

    def to_dict(self, protocol: dict[str, Any]) -> dict[str, Any]:
        return {
            "metric": "accepted length on the data.holdout prompts (measured by decoding)",
            "selected": f"step_{self.selected.step}",
            "prompts": self.prompts,
            "protocol": protocol,
            "candidates": [asdict(c) for c in self.candidates],
        }


def held_out_prompts(
    recipe: Recipe, layout: RunLayout, max_prompts: int | None = None
) -> list[BenchmarkPrompt]:
    """The first user turn of every held-out record (file order), at most ``max_prompts``."""
    from deepspec.data.sequences import load_training_records, split_holdout

    if recipe.data.holdout <= 0:
        raise SelectionError(
            "data.holdout is 0: no prompts were held out of training; set data.holdout (e.g. 64 or 0.02) "
            "in the recipe, train again, then select"
        )
    records = load_training_records(layout.local_input(layout.regenerated))
    _, held = split_holdout(records, recipe.data.holdout)
    prompts = []
    for rec in held:
        turns = [m["content"] for m in rec["messages"] if m.get("role") == "user" and m.get("content")]
        if turns:
            prompts.append(BenchmarkPrompt(HOLDOUT, len(prompts), turns[:1], int(rec.get("line", 0))))
    if not prompts:
        raise SelectionError(
            f"none of the {len(held)} held-out records of {layout.regenerated} has a user turn"
        )
    return prompts[:max_prompts] if max_prompts else prompts


def kept_steps(layout: RunLayout) -> list[int]:
    """Steps of ``training.output_dir`` whose weights are present, oldest first (local or S3)."""
    store = open_store(layout.checkpoints, layout.endpoint_url)
    return sorted({int(m.group(1)) for name in store.list() if (m := _STEP_WEIGHTS.match(name))})


def logged_losses(layout: RunLayout) -> dict[int, float]:
    """``step -> loss`` from ``metrics.jsonl`` beside the checkpoints (empty when absent)."""
    store = open_store(layout.checkpoints, layout.endpoint_url)
    if not store.exists("metrics.jsonl"):
        return {}
    losses = {}
    for line in store.read_text("metrics.jsonl").splitlines():
        try:
            row = json.loads(line)
            losses[int(row["step"])] = float(row["loss"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return losses


def step_path(layout: RunLayout, step: int) -> str:
    """``step_<N>`` of the run as a path that resolves to itself again (absolute, or an ``s3://`` URI):
    the evaluator resolves ``--checkpoint`` against ``storage.root``, which a relative root would repeat."""
    path = layout.checkpoint(step)
    return path if is_s3(path) else os.path.abspath(path)


class HoldoutEvaluator(Evaluator):
    """An :class:`Evaluator` whose prompt set is the held-out slice, and whose draft can be swapped."""

    def __init__(self, recipe: Recipe, options: EvalOptions, prompts: list[BenchmarkPrompt]) -> None:
        self._prompts = prompts
        super().__init__(recipe, options)

    def _load_benchmarks(self) -> dict[str, list[BenchmarkPrompt]]:
        return {HOLDOUT: self._prompts}

    def use_checkpoint(self, checkpoint: str) -> None:
        """Decode with the draft of ``checkpoint`` next (same target when its layer ids match)."""
        from deepspec.models import load_draft

        where, local = locate_checkpoint(self.layout, checkpoint)
        layer_ids = checkpoint_layer_ids(read_checkpoint_config(local))
        if layer_ids is not None and list(layer_ids) != list(self.target.layer_ids):
            raise SelectionError(
                f"{where} was trained on target layers {layer_ids}, the other checkpoints on "
                f"{list(self.target.layer_ids)}: select among checkpoints of one training run"
            )
        draft = load_draft(local, self.target)
        draft.eval()
        self.drafter, self.checkpoint = draft.as_drafter(self.target), str(where)
        self.engine = self.build_engine()

    def measure(self, step: int) -> Candidate:
        results, _ = self.evaluate()
        stats, _ = results[HOLDOUT]
        return Candidate(
            step=step,
            checkpoint=str(self.checkpoint),
            accept_length=round(stats.tau, 4),
            acceptance_ratio=round(stats.acceptance_ratio, 4),
            rounds=stats.rounds,
            conditional_acceptance=[round(a, 4) for a in stats.conditional_acceptance()],
        )


def select_checkpoint(recipe: Recipe, options: EvalOptions) -> Selection:
    """Measure every kept checkpoint on the held-out prompts; write ``selected`` and ``selection.json``."""
    layout = RunLayout.from_recipe(recipe)
    prompts = held_out_prompts(recipe, layout, options.max_prompts)
    steps = kept_steps(layout)
    if not steps:
        raise SelectionError(f"no step_<N> checkpoint with weights in {layout.checkpoints}: train first")
    print(
        f"selecting among {len(steps)} checkpoint(s) of {layout.checkpoints} on {len(prompts)} held-out prompts"
    )
    options.drafter, options.baseline = "checkpoint", False  # accepted length only: no target-alone decode
    options.checkpoint = step_path(layout, steps[0])
    evaluator = HoldoutEvaluator(recipe, options, prompts)
    if evaluator.dist.enabled:
        raise SelectionError("--select runs in one process: start it without torchrun")
    losses = logged_losses(layout)
    candidates = []
    for i, step in enumerate(steps):
        if i:
            evaluator.use_checkpoint(step_path(layout, step))
        candidate = evaluator.measure(step)
        candidate.train_loss = losses.get(step)
        print(f"  step_{step}: accepted length {candidate.accept_length:.3f} (loss {candidate.train_loss})")
        candidates.append(candidate)
    best = max(candidates, key=lambda c: (c.accept_length, c.step))
    store = open_store(layout.checkpoints, layout.endpoint_url)
    ev = recipe.evaluation
    protocol = {
        "temperature": ev.temperature,
        "num_proposals": ev.num_proposals,
        "max_new_tokens": ev.max_new_tokens,
        "thinking": ev.thinking,
        "seed": options.seed,
        "holdout": recipe.data.holdout,
    }
    selection = Selection(best, candidates, len(prompts), join(layout.checkpoints, SELECTED))
    store.write_text(SELECTION_FILE, json.dumps(selection.to_dict(protocol), indent=2) + "\n")
    store.write_text(SELECTED, f"step_{best.step}\n")  # last: the pointer only names a measured step
    return selection


def run_select(recipe: Recipe, options: EvalOptions) -> int:
    """``deepspec eval --select``: print the candidates' table and where the pointer was written."""
    selection = select_checkpoint(recipe, options)
    layout = RunLayout.from_recipe(recipe)
    latest = open_store(layout.checkpoints, layout.endpoint_url)
    latest_name = latest.read_text(LATEST).strip() if latest.exists(LATEST) else None
    print(
        f"selected step_{selection.selected.step} (accepted length {selection.selected.accept_length:.3f} on "
        f"{selection.prompts} held-out prompts; latest is {latest_name})"
    )
    print(f"pointer: {selection.pointer}  (evaluate it with --checkpoint {selection.pointer})")
    return 0


def read_selection(checkpoints_dir: str | Path) -> dict[str, Any]:
    """The ``selection.json`` of a local training output folder."""
    return json.loads((Path(checkpoints_dir) / SELECTION_FILE).read_text(encoding="utf-8"))
