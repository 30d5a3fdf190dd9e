"""``deepspec serve --draft``: speculative serving through the evaluation engine.

On a tiny random Llama with the n-gram drafter (its random answers repeat, so drafts are accepted
now and then): greedy answers are the plain server's answers token for token (lossless); seeded
sampled answers do not depend on the requests beside them; every answer carries its speculative
counts in vLLM's and (when asked) SGLang's shapes, consistent with each other and with the
relations vLLM's own test checks; ``/metrics`` has both engines' names with their types; sampling
parameters that speculative verification does not reproduce are refused with a 400.
The distribution-level losslessness of sampled verification is tested in tests/eval.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deepspec.config import Recipe
from deepspec.serve import serve_app
from deepspec.serve.app import create_app

NAME = "tiny"
QUESTIONS = ["Tell me about the sea.", "Count to ten.", "What is a cat?", "Say hello."]


@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    from deepspec.eval.serving import build_speculative_app
    from deepspec.serve.engine import GenerationEngine

    recipe = Recipe.model_validate({"target": {"model": tiny_model_dir}})
    spec_app = build_speculative_app(
        recipe, "ngram", device="cpu", num_proposals=3, max_batch_size=4, batch_wait_ms=50.0,
        served_model_name=NAME,
    )  # fmt: skip
    plain = create_app(
        GenerationEngine(tiny_model_dir, device="cpu", max_batch_size=4, batch_wait_ms=1.0),
        served_model_name=NAME,
    )
    with serve_app(spec_app) as spec_url, serve_app(plain) as plain_url:
        yield spec_url, plain_url


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0)


def _ask(url: str, question: str, **kw):
    return _client(url).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": question}], **kw
    )


def test_greedy_answers_are_the_targets_and_carry_statistics(servers):
    spec_url, plain_url = servers
    with ThreadPoolExecutor(4) as pool:  # concurrent requests: decoded together in one batch
        spec = list(pool.map(lambda q: _ask(spec_url, q, max_tokens=40, temperature=0.0), QUESTIONS))
    plain = [_ask(plain_url, q, max_tokens=40, temperature=0.0) for q in QUESTIONS]
    assert [r.choices[0].message.content for r in spec] == [r.choices[0].message.content for r in plain]
    assert [r.usage.completion_tokens for r in spec] == [r.usage.completion_tokens for r in plain]
    accepted = 0
    for r in spec:
        body = r.to_dict()
        m = body["metrics"]["speculative_decoding"]
        hist = m["acceptance_histogram"]
        assert len(hist) == 4 and m["num_spec_steps"] == sum(hist) > 0
        assert m["num_accepted_draft_tokens"] == sum(j * c for j, c in enumerate(hist))
        assert m["mean_acceptance_length"] == pytest.approx(
            1 + m["num_accepted_draft_tokens"] / m["num_spec_steps"]
        )
        assert m["num_draft_tokens"] >= m["num_accepted_draft_tokens"]
        # one verification step per committed run of tokens: steps + accepted + the prefill's token
        assert body["usage"]["completion_tokens"] <= 1 + m["num_spec_steps"] + m["num_accepted_draft_tokens"]
        assert "sglext" not in body  # SGLang's details only when asked
        accepted += m["num_accepted_draft_tokens"]
    assert accepted > 0, "the n-gram drafter should get some drafts accepted on repetitive answers"


def test_sglang_details_when_asked(servers):
    spec_url, _ = servers
    body = _ask(
        spec_url,
        QUESTIONS[0],
        max_tokens=24,
        temperature=0.0,
        extra_body={"return_spec_tokens_details": True},
    ).to_dict()
    d, v = body["sglext"]["spec_tokens_details"], body["metrics"]["speculative_decoding"]
    assert d["spec_verify_ct"] == v["num_spec_steps"]
    assert d["spec_num_correct_drafts"] == v["num_accepted_draft_tokens"]
    assert d["spec_num_proposed_drafts"] == v["num_draft_tokens"]
    assert d["spec_correct_drafts_histogram"] == v["acceptance_histogram"]
    assert d["spec_accept_length"] == pytest.approx(v["mean_acceptance_length"])


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(servers):
    spec_url, _ = servers
    kw = {"max_tokens": 24, "temperature": 0.8, "seed": 7}
    alone = _ask(spec_url, QUESTIONS[1], **kw).choices[0].message.content
    with ThreadPoolExecutor(3) as pool:
        crowd = list(
            pool.map(
                lambda q: _ask(spec_url, q, **kw).choices[0].message.content,
                [QUESTIONS[1], QUESTIONS[2], QUESTIONS[3]],
            )
        )
    assert crowd[0] == alone


def test_streamed_answer_ends_with_its_statistics(servers):
    spec_url, _ = servers
    whole = _ask(spec_url, QUESTIONS[2], max_tokens=24, temperature=0.0)
    chunks = [c.to_dict() for c in _ask(spec_url, QUESTIONS[2], max_tokens=24, temperature=0.0, stream=True)]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole.choices[0].message.content
    last = [c for c in chunks if c.get("metrics")]
    assert len(last) == 1 and last[0]["choices"][0]["finish_reason"] is not None
    assert last[0]["metrics"] == whole.to_dict()["metrics"]


def test_unsupported_sampling_is_a_clear_400(servers):
    spec_url, _ = servers
    with pytest.raises(openai.BadRequestError, match="top_p"):
        _ask(spec_url, QUESTIONS[0], max_tokens=4, top_p=0.5)


def test_metrics_have_both_engines_names_and_types(servers):
    spec_url, _ = servers
    _ask(spec_url, QUESTIONS[0], max_tokens=16, temperature=0.0)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(spec_url + "/metrics").text)}
    for name in (
        "vllm:spec_decode_num_drafts",
        "vllm:spec_decode_num_draft_tokens",
        "vllm:spec_decode_num_accepted_tokens",
        "vllm:spec_decode_num_accepted_tokens_per_pos",
        "sglang:generation_tokens",
        "sglang:spec_verify_calls",
    ):
        assert families[name].type == "counter", name
    for name in ("sglang:spec_accept_length", "sglang:spec_accept_rate"):
        assert families[name].type == "gauge", name
    per_pos = families["vllm:spec_decode_num_accepted_tokens_per_pos"].samples
    assert sorted(s.labels["position"] for s in per_pos) == ["0", "1", "2"]
    assert {s.labels["model_name"] for s in per_pos} == {NAME}
    drafts = families["vllm:spec_decode_num_drafts"].samples[0].value
    accepted = families["vllm:spec_decode_num_accepted_tokens"].samples[0].value
    assert drafts > 0 and sum(s.value for s in per_pos) == accepted
    assert 1.0 <= families["sglang:spec_accept_length"].samples[0].value <= 4.0
