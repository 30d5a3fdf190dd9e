"""Continuous batching: rows join and leave the running batch, and every row keeps its own contract."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from deepspec.data import render_prompt
from deepspec.serve import serve_app
from deepspec.serve.app import create_app
from deepspec.serve.engine import GenerationEngine
from deepspec.serve.sampling import SamplingParams

MSGS = [{"role": "user", "content": "Tell me about the sea."}]
OTHER = [{"role": "user", "content": "A much longer question about mountains, rivers, forests and the sky?"}]


def ids(engine, msgs=MSGS) -> list[int]:
    return render_prompt(engine.tokenizer, msgs, None)


def test_seeded_request_is_the_same_whatever_it_is_batched_with(tiny_model_dir):
    # two slots, five requests of different lengths: rows finish at different steps and the next
    # request takes the freed slot mid-run, so the seeded row sees different neighbours each time
    eng = GenerationEngine(tiny_model_dir, device="cpu", max_batch_size=2)
    a, b = ids(eng), ids(eng, OTHER)
    seeded = SamplingParams(temperature=1.0, seed=77, top_p=0.9, max_tokens=14)
    alone = eng.generate([a], [seeded])[0]
    others = [
        SamplingParams(temperature=1.3, max_tokens=3),
        SamplingParams(temperature=0.0, max_tokens=9),
        SamplingParams(temperature=0.7, seed=5, max_tokens=5),
        SamplingParams(temperature=1.0, top_k=3, max_tokens=20),
    ]
    for place in range(len(others) + 1):
        params = [*others[:place], seeded, *others[place:]]
        prompts = [b] * place + [a] + [b] * (len(others) - place)
        got = eng.generate(prompts, params)[place]
        assert got.token_ids == alone.token_ids, f"seeded row changed at place {place}"
    assert eng.stats["max_batch"] == 2 and eng.stats["batches"] > len(others)  # slots were refilled


def test_freed_slots_are_refilled_together_with_the_same_results(tiny_model_dir):
    # answers end at different lengths; with refill_min = 4 of 4 slots the engine waits until every
    # slot is free and admits four requests in one prefill (2 prefills for 8 requests), where
    # refill_min = 1 prefills again as each row finishes. Every request's tokens are the same.
    lengths = [2, 5, 3, 7, 4, 6, 2, 5]
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=n) for i, n in enumerate(lengths)]
    results, prefills = {}, {}
    for refill_min in (1, 4):
        eng = GenerationEngine(tiny_model_dir, device="cpu", max_batch_size=4, refill_min=refill_min)
        eng.eos_ids = []  # every request generates exactly max_tokens
        out = eng.generate([ids(eng, MSGS if i % 2 else OTHER) for i in range(len(lengths))], params)
        results[refill_min] = [c.token_ids for c in out]
        prefills[refill_min] = eng.stats["batches"]
    assert [len(t) for t in results[4]] == lengths
    assert results[4] == results[1]
    assert prefills[4] == 2 and prefills[1] > 2
    with pytest.raises(ValueError, match="refill_min"):
        GenerationEngine(tiny_model_dir, device="cpu", max_batch_size=4, refill_min=5)


def test_default_refill_is_an_eighth_of_the_slots(tiny_model_dir):
    assert GenerationEngine(tiny_model_dir, device="cpu", max_batch_size=64).refill_min == 8
    assert GenerationEngine(tiny_model_dir, device="cpu", max_batch_size=4).refill_min == 1


def test_every_sampling_parameter_is_honoured_under_continuous_batching(tiny_model_dir):
    eng = GenerationEngine(tiny_model_dir, device="cpu", max_batch_size=3)
    a, b = ids(eng), ids(eng, OTHER)
    greedy = eng.generate([a], [SamplingParams(temperature=0.0, max_tokens=12)])[0].token_ids
    wild = SamplingParams(temperature=1.5, seed=5, max_tokens=12)
    assert eng.generate([a], [wild])[0].token_ids != greedy  # without a cut, T=1.5 leaves the greedy path
    cuts = [
        SamplingParams(temperature=1.5, seed=5, top_k=1, max_tokens=12),
        SamplingParams(temperature=1.5, seed=5, min_p=1.0, max_tokens=12),
        SamplingParams(temperature=1.5, seed=5, top_p=1e-6, max_tokens=12),
    ]
    # the cut rows arrive one by one into slots freed by short unfiltered neighbours
    prompts, params = [], []
    for cut in cuts:
        prompts += [b, a]
        params += [SamplingParams(temperature=1.5, max_tokens=2), cut]
    results = eng.generate(prompts, params)
    for k in range(len(cuts)):
        assert results[2 * k + 1].token_ids == greedy, params[2 * k + 1]
    # max_tokens and stop strings per row
    full = eng.generate([a], [SamplingParams(temperature=1.0, seed=11, max_tokens=24)])[0]
    stop = eng.tokenizer.decode(full.token_ids[8:10])
    mixed = eng.generate(
        [b, a, a],
        [
            SamplingParams(temperature=1.0, max_tokens=30),
            SamplingParams(temperature=1.0, seed=11, max_tokens=24, stop=[stop]),
            SamplingParams(temperature=0.0, max_tokens=4),
        ],
    )
    assert mixed[1].finish_reason == "stop" and mixed[1].text == full.text[: full.text.find(stop)]
    assert (mixed[2].finish_reason, mixed[2].completion_tokens) == ("length", 4)


def test_streaming_sends_text_while_the_request_runs(tiny_model_dir):
    eng = GenerationEngine(tiny_model_dir, device="cpu", max_batch_size=4, batch_wait_ms=1.0)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=20, stop=["\x00never"])
    want = eng.generate([ids(eng)], [params])[0]
    pieces: list[tuple[str, bool]] = []
    holder: dict = {}
    ready = threading.Event()

    def listen(text: str) -> None:
        ready.wait()
        pieces.append((text, holder["future"].done()))

    eng.start()
    try:
        holder["future"] = eng.submit(ids(eng), params, listen)
        ready.set()
        result = holder["future"].result(timeout=120)
    finally:
        eng.stop()
    assert result.token_ids == want.token_ids
    assert len(pieces) > 3 and not any(done for _, done in pieces)  # sent before the answer was finished
    streamed = "".join(t for t, _ in pieces)
    assert result.text.startswith(streamed) and len(streamed) >= len(result.text) // 2


def test_http_streaming_chunks_and_metrics(tiny_model_dir):
    eng = GenerationEngine(tiny_model_dir, device="cpu", max_batch_size=4, batch_wait_ms=1.0)
    app = create_app(eng, served_model_name="tiny")
    with serve_app(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0)
        kw = {"model": "tiny", "messages": MSGS, "temperature": 0.0, "max_tokens": 10}
        expected = client.chat.completions.create(**kw).choices[0].message.content
        chunks = list(client.chat.completions.create(**kw, stream=True))
        content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(content) == expected and len(content) > 3  # one chunk per new piece of text
        metrics = httpx.get(url + "/metrics").text
    assert 'deepspec_requests_total{model="tiny"} 2.0' in metrics
    assert 'deepspec_generation_tokens_total{model="tiny"} 20.0' in metrics
    assert "deepspec_running_requests" in metrics and "deepspec_queued_requests" in metrics
    prefills = eng.stats["batches"]
    assert prefills >= 1 and f'deepspec_prefill_batches_total{{model="tiny"}} {float(prefills)}' in metrics
