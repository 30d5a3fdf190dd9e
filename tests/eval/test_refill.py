"""Refilled batches: a row whose prompt ended takes the next waiting prompt at once, and every prompt's
result is the one it gets alone (n-gram drafter and plain decoding here; the batched Eagle3 and
DFlash/DSpark drafters in their own test modules)."""

from __future__ import annotations

import pytest

from deepspec.eval.drafters import NGramDrafter
from deepspec.eval.engine import EngineConfig, SpeculativeEngine

from .batched_checks import REFILL_PROMPTS, check_refill_equals_alone


def ngram_engine(target, temperature: float, max_new_tokens: int = 48) -> SpeculativeEngine:
    stops = tuple(range(0, target.vocab_size, 9))  # prompts end after different numbers of rounds
    cfg = EngineConfig(
        num_proposals=3,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        stop_token_ids=stops,
        record_rounds=True,
    )
    make = lambda: NGramDrafter(target.vocab_size)  # noqa: E731
    return SpeculativeEngine(target, make(), cfg, drafter_factory=make)


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_refilled_prompts_equal_single_prompt_results(tiny_llama_target, temperature, plain):
    engine = ngram_engine(tiny_llama_target, temperature)
    got = check_refill_equals_alone(engine, rows=3, plain=plain)
    if not plain and temperature == 0:
        assert sum(r.stats.accepted for r in got) > 0  # the n-gram drafter's proposals get accepted


def test_prompts_that_end_at_their_first_token_are_refilled_at_once(tiny_llama_target):
    engine = ngram_engine(tiny_llama_target, 0.0, max_new_tokens=1)
    for batch in (engine.generate_batch, engine.generate_plain_batch):
        got = batch(REFILL_PROMPTS, rows=3)
        assert engine.last_batch.steps == 0 and engine.last_batch.refills == len(REFILL_PROMPTS) - 3
        assert [r.tokens for r in got] == [engine.generate(p).tokens for p in REFILL_PROMPTS]


def test_more_rows_than_prompts_decodes_them_all_at_once(tiny_llama_target):
    engine = ngram_engine(tiny_llama_target, 0.0)
    got = engine.generate_batch(REFILL_PROMPTS[:2], rows=8)
    assert [r.tokens for r in got] == [engine.generate(p).tokens for p in REFILL_PROMPTS[:2]]
    assert engine.core.rows >= 2 and engine.last_batch.refills == 0
