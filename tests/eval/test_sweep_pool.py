"""Batched evaluation pools the prompts of all benchmarks (a batch of 32 holds 32 rows even when each
benchmark has 16 prompts), keeps each row's counters with its own benchmark, and ``--sweep-prompts``
decodes the same round-robin subset at every batch size of the speedup sweep."""

from __future__ import annotations

import json

import pytest

from deepspec.config import Recipe


@pytest.fixture
def two_benchmarks(tmp_path):
    from deepspec.testing.tiny import save_tiny_target, tiny_recipe

    model_dir = save_tiny_target(str(tmp_path / "target"))
    bench = tmp_path / "bench"
    bench.mkdir()
    code = [["repeat: a b c a b c a b"], ["count 1 2 3 1 2 3", "again"], ["x y x y x"]]
    chat = [["hello there"], ["a a a a"]]
    for name, turns in (("code", code), ("chat", chat)):
        (bench / f"{name}.jsonl").write_text("".join(json.dumps({"turns": t}) + "\n" for t in turns))
    raw = tiny_recipe(model_dir, "regenerated.jsonl", "draft")
    raw["storage"] = {"root": str(tmp_path / "root")}
    raw["evaluation"] = {"benchmarks_dir": str(bench), "benchmarks": ["code", "chat"], "output_dir": "eval"}
    raw["evaluation"].update(max_new_tokens=8, temperature=1.0, all_turns=True)
    return Recipe.model_validate(raw)


def _evaluator(recipe, **options):
    from deepspec.eval.evaluator import EvalOptions, Evaluator

    return Evaluator(recipe, EvalOptions(drafter="ngram", device="cpu", progress=False, **options))


def test_batches_pool_benchmarks_and_counters_stay_per_benchmark(two_benchmarks):
    from deepspec.eval.batched import evaluate_batched
    from deepspec.eval.runner import evaluate_benchmarks

    ev = _evaluator(two_benchmarks)
    rows_per_call: list[int] = []
    generate = ev.engine.generate_batch

    def spy(ids, generators, rows=None):
        rows_per_call.append((len(ids), rows))
        return generate(ids, generators, rows=rows)

    single, _ = evaluate_benchmarks(ev.engine, ev.tokenizer, ev.benchmarks, ev.settings)
    ev.engine.generate_batch = spy
    batched, _ = evaluate_batched(ev.engine, ev.tokenizer, ev.benchmarks, ev.settings, batch_size=5)
    refilled, _ = evaluate_batched(ev.engine, ev.tokenizer, ev.benchmarks, ev.settings, batch_size=2)
    # all five first turns in five rows, then the one second turn; then in two rows, refilled as answers end
    assert rows_per_call == [(5, 5), (1, 5), (5, 2), (1, 2)]
    for name in ("code", "chat"):
        (s1, b1), (s5, b5), (s2, b2) = single[name], batched[name], refilled[name]
        for one, many in ((s1, s5), (b1, b5), (s1, s2), (b1, b2)):
            assert (many.rounds, many.accepted, many.new_tokens, many.prompts) == (
                one.rounds,
                one.accepted,
                one.new_tokens,
                one.prompts,
            )
    assert batched["chat"][0].prompts == 2 and batched["code"][0].prompts == 3


def test_sweep_prompts_decodes_the_same_subset_at_every_size(two_benchmarks, tmp_path):
    from deepspec.eval.batched import sweep_subset

    ev = _evaluator(two_benchmarks, batch_sizes=[1, 3], sweep_prompts=3)
    subset = sweep_subset(ev.benchmarks, 3)
    assert {k: [p.index for p in v] for k, v in subset.items()} == {"code": [0, 1], "chat": [0]}
    outcome = ev.run()
    rows = json.loads((tmp_path / "root" / "eval" / "batch_sweep.json").read_text())["rows"]
    assert [(r["batch_size"], r["prompts"]) for r in rows] == [(1, 3), (3, 3)]
    assert rows[0]["accept_length"] == rows[1]["accept_length"]  # lossless: the same tokens per row
    report = json.loads((tmp_path / "root" / "eval" / "report.json").read_text())
    assert sum(b["prompts"] for b in report["benchmarks"].values()) == 5  # the main report: every prompt
    assert "3 prompts at every batch size" in outcome.markdown
