"""The generation engine: per-request sampling inside one ``generate`` batch, stops, batching."""

from __future__ import annotations

import torch

from deepspec.data import render_prompt
from deepspec.serve.engine import GenerationEngine
from deepspec.serve.sampling import SamplingParams

MSGS = [{"role": "user", "content": "Tell me about the sea."}]
OTHER = [{"role": "user", "content": "A much longer question about mountains, rivers, forests and the sky?"}]


def prompt(engine, msgs=MSGS, **kw) -> list[int]:
    return render_prompt(engine.tokenizer, msgs, kw or None)


def hf_greedy(engine, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = engine.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n)
    return out[0, len(ids) :].tolist()


def one(engine, ids, **kw):
    return engine.generate([ids], [SamplingParams(**kw)])[0]


def test_greedy_equals_model_generate_greedy(engine):
    ids = prompt(engine)
    r = one(engine, ids, temperature=0.0, max_tokens=16)
    assert r.token_ids == hf_greedy(engine, ids, 16)[: len(r.token_ids)]
    assert r.prompt_tokens == len(ids)


def test_greedy_row_is_unchanged_by_batch_neighbours(engine):
    a, b = prompt(engine), prompt(engine, OTHER)
    solo = one(engine, a, temperature=0.0, max_tokens=12)
    both = engine.generate(
        [b, a], [SamplingParams(temperature=1.0, seed=3, max_tokens=20), SamplingParams(0.0, max_tokens=12)]
    )
    assert both[1].token_ids == solo.token_ids


def test_seed_determinism_at_temperature_one(engine):
    ids = prompt(engine)
    r1 = one(engine, ids, temperature=1.0, seed=1234, max_tokens=16)
    r2 = one(engine, ids, temperature=1.0, seed=1234, max_tokens=16)
    r3 = one(engine, ids, temperature=1.0, seed=99, max_tokens=16)
    assert r1.token_ids == r2.token_ids
    assert r1.token_ids != r3.token_ids
    # the seeded row draws from its own generator: neighbours in the batch do not change it
    batch = engine.generate(
        [prompt(engine, OTHER), ids],
        [
            SamplingParams(temperature=1.0, max_tokens=16),
            SamplingParams(temperature=1.0, seed=1234, max_tokens=16),
        ],
    )
    assert batch[1].token_ids == r1.token_ids


def test_top_k_min_p_top_p_are_honoured(engine):
    ids = prompt(engine)
    greedy = one(engine, ids, temperature=0.0, max_tokens=12).token_ids
    sampled = one(engine, ids, temperature=1.5, seed=5, max_tokens=12).token_ids
    assert sampled != greedy  # without a cut, T=1.5 wanders off the greedy path
    assert one(engine, ids, temperature=1.5, seed=5, top_k=1, max_tokens=12).token_ids == greedy
    assert one(engine, ids, temperature=1.5, seed=5, min_p=1.0, max_tokens=12).token_ids == greedy
    assert one(engine, ids, temperature=1.5, seed=5, top_p=1e-6, max_tokens=12).token_ids == greedy


def test_max_tokens_gives_length(engine):
    r = one(engine, prompt(engine), temperature=0.0, max_tokens=5)
    assert (r.finish_reason, r.completion_tokens) == ("length", 5)


def test_stop_string_cuts_and_gives_stop(engine):
    ids = prompt(engine)
    kw = {"temperature": 1.0, "seed": 11, "max_tokens": 24}
    first = one(engine, ids, **kw)
    full = first.text
    stop = engine.tokenizer.decode(first.token_ids[8:10])  # the text of tokens 9 and 10
    assert stop.strip()
    r = one(engine, ids, **kw, stop=["never appears \x00", stop])
    assert r.finish_reason == "stop"
    assert r.text == full[: full.find(stop)]
    assert r.completion_tokens < 24


def test_eos_gives_stop_and_is_counted(tiny_model_dir):
    eng = GenerationEngine(tiny_model_dir, device="cpu")
    ids = prompt(eng)
    first = one(eng, ids, temperature=0.0, max_tokens=4).token_ids[0]
    eng.eos_ids = [first]  # pretend the model's first greedy token is its end-of-sequence token
    r = one(eng, ids, temperature=0.0, max_tokens=8)
    assert (r.finish_reason, r.completion_tokens, r.text) == ("stop", 1, "")


def test_waiting_requests_share_one_batch(tiny_model_dir):
    eng = GenerationEngine(tiny_model_dir, device="cpu", max_batch_size=4, batch_wait_ms=1.0)
    ids = prompt(eng)
    futures = [eng.submit(ids, SamplingParams(temperature=0.0, max_tokens=6)) for _ in range(4)]
    eng.start()  # the four requests are already queued: the worker takes them together
    try:
        results = [f.result(timeout=120) for f in futures]
    finally:
        eng.stop()
    assert eng.stats["batches"] == 1 and eng.stats["max_batch"] == 4
    assert len({tuple(r.token_ids) for r in results}) == 1
