"""``torchrun --nproc-per-node 2 -m deepspec.cli eval``: the report of 2 processes equals the report of
one process on the same prompts (a trained tiny Eagle3 draft, seeded sampling at T = 1, two benchmarks
of which one has two turns). Only wall-clock figures (decode times, speedups) may differ."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from deepspec.testing.tiny import tiny_recipe

from .launch import train_env, train_here

# wall-clock figures (and what is computed from them), and the report's creation time
TIMING = {
    "tokens_per_second",
    "baseline_tokens_per_second",
    "decode_seconds",
    "speedup",
    "verify_rate",
    "created",
}


def _strip_timing(value):
    if isinstance(value, dict):
        return {k: _strip_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_strip_timing(v) for v in value]
    return value


def _eval(recipe: Path, checkpoint: Path, out: Path, world: int) -> dict:
    base = ["-m", "deepspec.cli", "eval", "-c", str(recipe), "--checkpoint", str(checkpoint),
            "--output", str(out), "--device", "cpu", "--no-progress"]  # fmt: skip
    if world > 1:
        base = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *base]
    proc = subprocess.run(
        [sys.executable, *base], env=train_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode in (0, 3), proc.stderr[-3000:]  # 3: below the gate (none is set here)
    return json.loads((out / "report.json").read_text())


def test_eval_report_of_two_processes_equals_one(tmp_path, tiny_dir, tiny_data):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "gsm8k.jsonl").write_text(
        "".join(json.dumps({"turns": [f"what is {i} plus {i + 2}?"]}) + "\n" for i in range(5))
    )
    (bench / "mt-bench.jsonl").write_text(
        "".join(
            json.dumps({"turns": [f"tell me about {w}", "and more"]}) + "\n" for w in ("cats", "rain", "tea")
        )
    )
    r = tiny_recipe(tiny_dir, tiny_data, str(tmp_path / "draft"), algorithm="eagle3",
                    training={"max_steps": 2, "save_every": 2},
                    evaluation={"benchmarks_dir": str(bench), "benchmarks": ["gsm8k", "mt-bench"],
                                "all_turns": True, "max_new_tokens": 12, "num_proposals": 3,
                                "temperature": 1.0})  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(r))
    train_here(recipe)  # the checkpoint both evaluations read
    checkpoint = tmp_path / "draft"
    one = _eval(recipe, checkpoint, tmp_path / "one", 1)
    two = _eval(recipe, checkpoint, tmp_path / "two", 2)
    assert one["benchmarks"]["gsm8k"]["prompts"] == 5 and one["benchmarks"]["mt-bench"]["prompts"] == 3
    assert (one.pop("world_size"), two.pop("world_size")) == (1, 2)
    assert _strip_timing(one) == _strip_timing(two)  # rounds, accepted lengths, per-position acceptance...
