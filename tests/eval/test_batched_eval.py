"""``deepspec eval --batch-size``: lockstep batches give the single-prompt counters; the sweep report."""

from __future__ import annotations

import json

import pytest

from deepspec.config import Recipe


@pytest.fixture
def ngram_recipe(tmp_path):
    from deepspec.testing.tiny import save_tiny_target, tiny_recipe

    model_dir = save_tiny_target(str(tmp_path / "target"))
    bench = tmp_path / "bench"
    bench.mkdir()
    turns = [["repeat: a b c a b c a b"], ["count 1 2 3 1 2 3", "again"], ["x y x y x"], ["hello"], ["a a a"]]
    (bench / "code.jsonl").write_text("".join(json.dumps({"turns": t}) + "\n" for t in turns))
    raw = tiny_recipe(model_dir, "regenerated.jsonl", "draft")
    raw["storage"] = {"root": str(tmp_path / "root")}
    raw["evaluation"] = {"benchmarks_dir": str(bench), "benchmarks": ["code"], "output_dir": "eval"}
    raw["evaluation"].update(max_new_tokens=10, temperature=1.0, all_turns=True)
    return Recipe.model_validate(raw)


def test_batched_counters_equal_single_prompt_counters(ngram_recipe):
    from deepspec.eval.batched import evaluate_batched
    from deepspec.eval.evaluator import EvalOptions, Evaluator
    from deepspec.eval.runner import evaluate_benchmarks

    ev = Evaluator(ngram_recipe, EvalOptions(drafter="ngram", device="cpu", progress=False))
    single, _ = evaluate_benchmarks(ev.engine, ev.tokenizer, ev.benchmarks, ev.settings)
    batched, _ = evaluate_batched(ev.engine, ev.tokenizer, ev.benchmarks, ev.settings, batch_size=3)
    (s1, b1), (s3, b3) = single["code"], batched["code"]
    for one, many in ((s1, s3), (b1, b3)):
        assert (many.rounds, many.accepted, many.proposed, many.new_tokens, many.prompts) == (
            one.rounds,
            one.accepted,
            one.proposed,
            one.new_tokens,
            one.prompts,
        )
    assert s1.prompts == 5 and s1.rounds > 5  # every prompt, both turns of the second one


def test_batch_size_sweep_reports_speedup_per_size(ngram_recipe, tmp_path):
    from deepspec.eval.cli import parse_batch_sizes
    from deepspec.eval.evaluator import EvalOptions, Evaluator

    sizes = parse_batch_sizes("1,4")
    outcome = Evaluator(
        ngram_recipe, EvalOptions(drafter="ngram", device="cpu", progress=False, batch_sizes=sizes)
    ).run()
    out = tmp_path / "root" / "eval"
    rows = json.loads((out / "batch_sweep.json").read_text())["rows"]
    assert [r["batch_size"] for r in rows] == [1, 4]
    assert rows[0]["accept_length"] == rows[1]["accept_length"]  # lossless: the same tokens per row
    assert all(r["speedup"] > 0 and r["plain_tokens_per_s"] > 0 for r in rows)
    assert (out / "speedup_vs_batch.png").stat().st_size > 1000
    assert "Speedup against batch size" in (out / "report.md").read_text() and outcome is not None
    assert "| 4 |" in outcome.markdown
    with pytest.raises(SystemExit, match="positive integers"):
        parse_batch_sizes("1,0")
