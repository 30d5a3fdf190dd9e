"""The :class:`Evaluator`: one owner for an evaluation run, as the :class:`~deepspec.train.trainer.Trainer`
owns training.

It lists its whole inventory as typed attributes and builds it in one readable sequence in
``__init__``: protocol (recipe + options) -> paths (run layout) -> distributed set-up and device ->
target + drafter -> tokenizer -> DSpark scheduler / calibration -> engine -> benchmarks.
:meth:`Evaluator.run` decodes this rank's share of the prompts, and on rank 0 merges the ranks,
calibrates (optional), writes the report and applies the acceptance gate.

Paths go through :class:`~deepspec.layout.RunLayout`: a relative ``--checkpoint`` is an output of the run
(under ``storage.root``), an ``s3://`` checkpoint is downloaded (only the draft's files), and an
``s3://`` report directory is written locally, then uploaded when the report is complete.

Seam for batched evaluation: the engine is one component, built by :meth:`Evaluator.build_engine`,
and :meth:`Evaluator.evaluate` decodes the benchmarks with one engine. A batch-size sweep loops over
the batch sizes in :meth:`Evaluator.run`, building one engine per size and keeping one ``Results`` per
size (speedup per batch size); the rank files, merge and report take one ``Results`` each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from deepspec.config import Recipe
from deepspec.data.template import template_kwargs
from deepspec.devices import DistInfo, init_distributed
from deepspec.eval.benchmarks import BenchmarkPrompt, load_benchmarks
from deepspec.eval.calibration import Calibration, CalibrationData, evaluate_held_out
from deepspec.eval.engine import EngineConfig, RoundRecord, SpeculativeEngine
from deepspec.eval.runner import (
    Results,
    RunSettings,
    evaluate_benchmarks,
    merge_rank_files,
    stop_token_ids,
    write_rank_file,
)
from deepspec.eval.scheduler import CostCurve, PrefixScheduler, profile_cost_curve
from deepspec.eval.summary import EvalSummary, GateDecision, gate_decision
from deepspec.layout import RunLayout
from deepspec.storage import is_s3

if TYPE_CHECKING:
    import torch

    from deepspec.models.base import SpeculativeDrafter
    from deepspec.target_model.model import TargetModel

Records = list[tuple[str, int, RoundRecord]]
MIN_CALIBRATION_ROUNDS = 20


@dataclass
class EvalOptions:
    """What a run sets beyond the recipe (the ``deepspec eval`` options)."""

    checkpoint: str | None = None
    drafter: Literal["checkpoint", "ngram"] = "checkpoint"
    output: str | None = None  # report directory (default: evaluation.output_dir under the root)
    benchmarks: list[str] | None = None
    max_prompts: int | None = None
    seed: int = 0
    device: str | None = None
    baseline: bool = True  # also decode with the target alone (tokens/s, speedup)
    confidence_threshold: float | None = None
    scheduler: str | None = None  # 'auto' or a cost-curve JSON file
    calibration: str | None = None  # STS calibration JSON to apply
    calibrate: bool = False  # fit STS on half of the prompts' rounds, report ECE on the other half
    termination_log: str | None = None
    progress: bool = True
    baseline_accept_length: float | None = None  # the gate's max_drop reference
    batch_sizes: list[int] | None = None  # lockstep batched decoding, one evaluation per size (sweep)
    sweep_prompts: int | None = None  # the sweep decodes this many prompts at every size (None: all)


@dataclass
class EvalOutcome:
    """What rank 0 produced: the full report, its compact summary, the gate decision, the files."""

    report: dict[str, Any]
    summary: EvalSummary
    gate: GateDecision
    report_dir: str
    markdown: str


def run_settings(recipe: Recipe, options: EvalOptions) -> RunSettings:
    """How prompts are run: turns, seeds, baseline, and the chat-template kwargs of the one rendering
    rule (the recipe's regeneration kwargs, thinking switched by ``evaluation.thinking``)."""
    ev = recipe.evaluation
    return RunSettings(
        seed=options.seed,
        all_turns=ev.all_turns,
        template_kwargs=template_kwargs(recipe.regeneration, thinking=ev.thinking),
        baseline=options.baseline,
        progress=options.progress,
    )


class EvalSetupError(ValueError):
    """The options cannot make an evaluation (the message says which option to set)."""


class Evaluator:
    """Evaluates one drafter (a checkpoint or n-gram lookup) on the recipe's benchmark suite."""

    recipe: Recipe
    options: EvalOptions
    layout: RunLayout
    report_dir: str  # local path or s3:// URI
    dist: DistInfo
    device: torch.device
    target: TargetModel
    drafter: SpeculativeDrafter
    algorithm: str
    checkpoint: str | None  # where the evaluated step lives (local path or s3:// URI); None for n-gram
    tokenizer: Any
    scheduler: PrefixScheduler | None
    calibration: Calibration | None
    settings: RunSettings
    engine: SpeculativeEngine
    benchmarks: dict[str, list[BenchmarkPrompt]]

    def __init__(self, recipe: Recipe, options: EvalOptions) -> None:
        self.recipe, self.options = recipe, options
        ev = recipe.evaluation
        if options.benchmarks:
            ev.benchmarks = list(options.benchmarks)
        if options.max_prompts:
            ev.max_prompts = options.max_prompts
        if options.drafter == "checkpoint" and not options.checkpoint:
            raise EvalSetupError("--checkpoint is required (or --drafter ngram)")

        self.layout = RunLayout.from_recipe(recipe)
        self.report_dir = self.layout.resolve(options.output) if options.output else self.layout.eval_dir
        self.dist, self.device = init_distributed(options.device)
        if options.batch_sizes and self.dist.enabled:
            raise EvalSetupError("--batch-size runs in one process: start it without torchrun")
        self.target, self.drafter, self.algorithm, self.checkpoint = self._load_models()
        from deepspec.eval import checkpoints

        self.tokenizer = checkpoints.load_tokenizer(self.target)
        self.scheduler = self._build_scheduler()
        self.calibration = (
            Calibration.load(self.layout.local_input(options.calibration)) if options.calibration else None
        )
        self.settings = run_settings(recipe, options)
        self.engine = self.build_engine()
        self.benchmarks = self._load_benchmarks()

    # ------------------------------------------------------------------------------ building

    def _load_models(self) -> tuple[TargetModel, SpeculativeDrafter, str, str | None]:
        """(target, drafter, algorithm, checkpoint location); checkpoints resolved through the layout."""
        from deepspec.eval import checkpoints

        r = self.recipe
        if self.options.drafter == "ngram":
            from deepspec.eval.drafters import NGramDrafter
            from deepspec.target_model.model import TargetModel

            target = TargetModel.from_pretrained(
                r.target.model,
                r.draft.target_layer_ids,
                r.draft.algorithm,
                device=self.device,
                dtype=r.target.dtype,
                trust_remote_code=r.target.trust_remote_code,
            )
            return target, NGramDrafter(target.vocab_size), "ngram", None
        assert self.options.checkpoint is not None
        target, draft, where = checkpoints.load_target_and_draft(r, self.options.checkpoint, self.device)
        return target, draft.as_drafter(target), draft.algorithm, str(where)

    def _build_scheduler(self) -> PrefixScheduler | None:
        choice = self.options.scheduler
        if choice == "auto":
            return PrefixScheduler(
                profile_cost_curve(self.target, max_tokens=self.recipe.evaluation.num_proposals + 1)
            )
        if choice:
            path = self.layout.local_input(choice)
            return PrefixScheduler(CostCurve.from_dict(json.loads(path.read_text(encoding="utf-8"))))
        return None

    def build_engine(self) -> SpeculativeEngine:
        """The decoding engine of this run (the one place a batched engine would be chosen)."""
        ev = self.recipe.evaluation
        cfg = EngineConfig(
            num_proposals=ev.num_proposals,
            temperature=ev.temperature,
            max_new_tokens=ev.max_new_tokens,
            stop_token_ids=stop_token_ids(self.tokenizer, self.target.config),
            confidence_threshold=self.options.confidence_threshold,
            record_rounds=self.options.calibrate,
            batched_drafter=ev.batched_drafter,
        )
        from deepspec.eval.batched import drafter_factory

        return SpeculativeEngine(
            self.target,
            self.drafter,
            cfg,
            scheduler=self.scheduler,
            calibration=self.calibration,
            drafter_factory=drafter_factory(self.drafter),
        )

    def _load_benchmarks(self) -> dict[str, list[BenchmarkPrompt]]:
        """The selected prompts; an ``s3://`` benchmark folder is downloaded first."""
        folder = self.layout.benchmarks_dir
        local = self.layout.local_input(folder) if is_s3(folder) else folder
        return load_benchmarks(self.recipe.evaluation, local)

    # ------------------------------------------------------------------------------ running

    def evaluate(self, engine: SpeculativeEngine | None = None) -> tuple[Results, Records]:
        """This rank's share of every benchmark, decoded by ``engine`` (default: :attr:`engine`)."""
        if self.options.batch_sizes:  # the main report is the first batch size's
            from deepspec.eval.batched import evaluate_batched

            engine, sizes = engine or self.engine, self.options.batch_sizes
            return evaluate_batched(engine, self.tokenizer, self.benchmarks, self.settings, sizes[0])
        return evaluate_benchmarks(
            engine or self.engine,
            self.tokenizer,
            self.benchmarks,
            self.settings,
            self.dist.rank,
            self.dist.world_size,
        )

    def parts_dir(self) -> Path:
        """Where the ranks leave their counters for rank 0 (beside the report when it is local)."""
        if is_s3(self.report_dir):
            return self.layout.work_dir(self.report_dir)
        return Path(self.report_dir)

    def run(self) -> EvalOutcome | None:
        """Evaluate; rank 0 returns the outcome (report written), other ranks None."""
        results, records = self.evaluate()
        write_rank_file(results, records, self.parts_dir(), self.dist.rank)
        self.dist.barrier()
        if not self.dist.is_main:
            return None
        results, records = merge_rank_files(self.parts_dir(), self.dist.world_size)
        with self.layout.local_output(self.report_dir) as out:
            calibration = self._calibrate(records, out) if self.options.calibrate else None
            report = self._report(results, calibration)
            from deepspec.eval.report import write_report

            paths = write_report(report, out, self.options.termination_log)
            markdown = paths["markdown"].read_text(encoding="utf-8")
            if self.options.batch_sizes:
                from deepspec.eval.batched import batch_sweep

                sizes = self.options.batch_sizes
                markdown += batch_sweep(
                    self.engine, self.tokenizer, self.benchmarks, self.settings, sizes, results, out,
                    self.options.sweep_prompts,
                )  # fmt: skip
        summary = EvalSummary.from_report(report)
        gate = gate_decision(summary, self.recipe.evaluation.gate, self.options.baseline_accept_length)
        return EvalOutcome(report, summary, gate, self.report_dir, markdown)

    def _calibrate(self, records: Records, out: Path) -> dict[str, Any] | None:
        """Fit STS on even prompts' rounds, measure ECE on odd prompts' (held-out prompts, unseen)."""
        rounds = [(i, r) for _, i, r in records if r.confidence]
        if len(rounds) < MIN_CALIBRATION_ROUNDS:
            print(f"warning: only {len(rounds)} rounds with confidences: skipping STS calibration")
            return None
        fit = [(r.confidence, r.accepted) for i, r in rounds if i % 2 == 0]
        held = [(r.confidence, r.accepted) for i, r in rounds if i % 2 == 1]
        cal = evaluate_held_out(CalibrationData.from_rounds(fit), CalibrationData.from_rounds(held))
        cal.save(out / "calibration.json")
        print(f"STS calibration: held-out ECE {cal.mean_ece_before:.4f} -> {cal.mean_ece_after:.4f}")
        return cal.to_dict()

    def _report(self, results: Results, calibration: dict[str, Any] | None) -> dict[str, Any]:
        from deepspec.eval.report import build_report

        ev, o = self.recipe.evaluation, self.options
        protocol = {
            "temperature": ev.temperature,
            "num_proposals": ev.num_proposals,
            "max_new_tokens": ev.max_new_tokens,
            "all_turns": ev.all_turns,
            "thinking": ev.thinking,
            "chat_template_kwargs": self.settings.template_kwargs,
            "seed": o.seed,
            "shuffle_seed": ev.shuffle_seed,
            "confidence_threshold": o.confidence_threshold,
            "scheduler": self.scheduler.curve.to_dict() if self.scheduler else None,
            "calibration": o.calibration,
            "device": self.device.type,  # speedup is a GPU figure: the report says so elsewhere
        }
        return build_report(
            results,
            algorithm=self.algorithm,
            target=self.recipe.target.model,
            target_revision=self.recipe.target.revision,
            checkpoint=self.checkpoint,
            protocol=protocol,
            world_size=self.dist.world_size,
            calibration=calibration,
        )
