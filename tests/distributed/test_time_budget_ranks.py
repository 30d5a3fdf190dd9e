"""``training.time_budget_minutes`` under torchrun (2 processes, gloo): the ranks agree on the plan and on
the step where the budget stops the run, although they time their steps differently.

Rank 1's clock runs twice as fast as rank 0's (a ``sitecustomize`` module on the workers' path replaces
``time.perf_counter`` there before deepspec is imported, and ``Trainer.clock`` is read from it). Alone,
rank 1 would plan about half of rank 0's steps and spend its budget first; a rank that left the loop
alone would leave the other waiting in a collective (gloo raises, or the run hangs until the timeout).
The trainer plans with the slowest rank's pace and stops all ranks at one step (``_max_over_ranks``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess

from .launch import train_cmd, train_env, write_recipe

FAST_CLOCK = """\
import os
import time

if os.environ.get("RANK") == "1":  # torchrun's worker rank; the launcher itself has none
    _real = time.perf_counter
    _start = _real()
    time.perf_counter = lambda: _start + 2.0 * (_real() - _start)
"""


def test_ranks_with_different_clocks_plan_and_stop_together(tmp_path, tiny_dir, tiny_data) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAST_CLOCK)
    planned_without_budget = 100_000
    recipe = write_recipe(
        tmp_path, "out", tiny_dir, tiny_data, "dspark",
        max_steps=planned_without_budget, global_batch_size=4, save_every=100_000, log_every=1,
        time_budget_minutes=0.1,  # 6 s of training: more than the 12 planning steps, far less than the plan
    )  # fmt: skip
    env = train_env(PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(train_cmd(recipe, 2), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    plans = {int(n) for n in re.findall(r"do not fit at [0-9.]+ s/step; planning (\d+)", proc.stderr)}
    assert len(plans) == 1, f"ranks planned differently or not at all: {plans}\n{proc.stderr[-2000:]}"
    planned = plans.pop()
    assert planned < planned_without_budget
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]["step"]
    assert [r["step"] for r in rows] == list(range(1, last + 1))  # every step logged once
    assert last <= planned  # the plan fitted, or the budget stopped every rank at one step
    assert (tmp_path / "out" / "latest").read_text().strip() == f"step_{last}"
    for rank in (0, 1):
        assert (tmp_path / "out" / f"step_{last}" / f"rng_rank{rank}.pt").is_file()
