"""Item 6 of issue 13: the evaluation report says when its speedup is no speedup figure, and what the
accepted length means next to the n-gram floor (the CPU demo printed a bare 0.5x before)."""

from __future__ import annotations

import pytest

from deepspec.eval.metrics import AcceptanceStats
from deepspec.eval.report import build_report, markdown_table


def _stats(accepted: list[int], proposed: int, seconds: float, tokens: int) -> AcceptanceStats:
    s = AcceptanceStats(prompts=1)
    for a in accepted:
        s.add_round(proposed, a)
    s.decode_seconds, s.new_tokens = seconds, tokens
    return s


def _report(
    device: str, algorithm: str = "eagle3", checkpoint: str | None = "runs/demo/draft/step_20"
) -> dict:
    spec = _stats([0, 1, 0, 2], proposed=7, seconds=2.0, tokens=7)  # tau 1.75, 2 rounds/s
    base = _stats([0] * 7, proposed=0, seconds=1.0, tokens=7)  # 7 plain steps/s
    return build_report(
        {"gsm8k": (spec, base)}, algorithm=algorithm, target="smollm2", target_revision=None,
        checkpoint=checkpoint, protocol={"temperature": 0.0, "num_proposals": 7, "max_new_tokens": 48, "device": device},
    )  # fmt: skip


def test_cpu_speedup_is_flagged_and_explained():
    report = _report("cpu")
    text = markdown_table(report)
    assert report["macro"]["speedup"] == pytest.approx(0.5)
    assert "**The speedup is not meaningful here**: it was measured on cpu" in text
    # the measured decomposition: one round cost 3.5 plain steps (7 tok/s plain, 2 rounds/s), tau 1.75
    assert "took 3.50x the time of a plain decoding step" in text and "tau / 3.50" in text
    assert "trained for 20 optimizer steps" in text
    assert "n-gram (prompt lookup) floor" in text and "8 is the ceiling" in text


def test_gpu_speedup_is_not_flagged():
    text = markdown_table(_report("cuda"))
    assert "not meaningful" not in text and "Speedup 0.50x" in text


def test_the_floor_says_it_is_the_floor():
    text = markdown_table(_report("cpu", algorithm="ngram", checkpoint=None))
    assert "This is the n-gram (prompt lookup) floor" in text and "optimizer steps" not in text
