"""``training.time_budget_minutes``: a run that does not fit its time slot is re-planned to fit (its
learning-rate schedule still completes) and stops with a checkpoint when the budget is spent.

The clock is the trainer's own (``Trainer.clock``), advanced by a fixed amount per optimizer step, so
the test is deterministic whatever the machine's speed."""

from __future__ import annotations

import json

import pytest

from deepspec.config import Recipe
from deepspec.testing.tiny import tiny_recipe
from deepspec.train.trainer import BUDGET_TIMED_STEPS, BUDGET_USABLE, BUDGET_WARMUP_STEPS, Trainer


def _trainer(tmp_path, tiny_dir: str, tiny_data: str, **training) -> Trainer:
    section = {"global_batch_size": 2, "micro_batch_size": 2, "log_every": 1000, "save_every": 1000,
               "warmup_ratio": 0.1, "min_lr_ratio": 0.1, **training}  # fmt: skip
    recipe = Recipe.model_validate(
        tiny_recipe(tiny_dir, tiny_data, str(tmp_path / "out"), "eagle3", training=section)
    )
    return Trainer(recipe, device="cpu", progress=False)


def _fake_clock(trainer: Trainer, seconds_per_step) -> list[float]:
    """Replace the trainer's clock; each optimizer step then takes ``seconds_per_step(step)``."""
    now = [0.0]
    trainer.clock = lambda: now[0]
    step = trainer.train_step

    def timed_step(stats) -> None:
        step(stats)
        now[0] += seconds_per_step(trainer.step)

    trainer.train_step = timed_step
    return now


def test_plan_is_cut_to_the_budget_and_the_schedule_completes(tmp_path, tiny_dir, tiny_data) -> None:
    trainer = _trainer(tmp_path, tiny_dir, tiny_data, max_steps=500, time_budget_minutes=0.5)  # 30 s
    _fake_clock(trainer, lambda step: 1.0)
    trainer.train()
    trainer.close()
    timed = BUDGET_WARMUP_STEPS + BUDGET_TIMED_STEPS
    expected = timed + int(BUDGET_USABLE * (30 - timed) / 1.0)
    assert trainer.step == trainer.total_steps == expected  # not 500, and not stopped short by the clock
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(
        0.1 * trainer.recipe.training.lr
    )  # cosine floor
    latest = (tmp_path / "out" / "latest").read_text().strip()
    assert latest.endswith(f"step_{expected}")


def test_budget_spent_stops_with_a_checkpoint(tmp_path, tiny_dir, tiny_data) -> None:
    trainer = _trainer(tmp_path, tiny_dir, tiny_data, max_steps=500, time_budget_minutes=0.5)
    # Fast while timed, then five times slower: the re-planned run cannot finish inside the budget.
    _fake_clock(trainer, lambda step: 1.0 if step <= BUDGET_WARMUP_STEPS + BUDGET_TIMED_STEPS else 5.0)
    trainer.train()
    trainer.close()
    assert trainer.step < trainer.total_steps < 500
    assert trainer.step == BUDGET_WARMUP_STEPS + BUDGET_TIMED_STEPS + 4  # 12 s + 4 x 5 s >= 30 s
    latest = (tmp_path / "out" / "latest").read_text().strip()
    assert latest.endswith(f"step_{trainer.step}")
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == trainer.step  # the last step's metrics are kept


def test_without_a_budget_the_plan_is_untouched(tmp_path, tiny_dir, tiny_data) -> None:
    trainer = _trainer(tmp_path, tiny_dir, tiny_data, max_steps=15)
    _fake_clock(trainer, lambda step: 1000.0)
    trainer.train()
    trainer.close()
    assert trainer.step == trainer.total_steps == 15
