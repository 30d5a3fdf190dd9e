"""The HTTP layer through the real ``openai`` client, on a tiny random Llama served in-process."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch

from deepspec.config import TargetConfig
from deepspec.serve import embedded_server, serve_app
from deepspec.serve.app import create_app
from deepspec.serve.engine import GenerationEngine

NAME = "tiny"
REVISION = "rev-abc123"
MSGS = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "requests.jsonl"
    engine = GenerationEngine(tiny_model_dir, device="cpu", max_batch_size=8, batch_wait_ms=1.0)
    app = create_app(engine, served_model_name=NAME, revision=REVISION, request_log=str(log))
    with serve_app(app) as url:
        yield {"url": url, "engine": engine, "log": log}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="EMPTY", max_retries=0)


def chat(client, **kw):
    return client.chat.completions.create(model=NAME, messages=MSGS, **kw)


def test_health_and_models_report_provenance(server, client):
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert models[0].owned_by == "deepspec"
    assert models[0].model_extra["revision"] == REVISION


def test_completion_shape_usage_and_fingerprint(client):
    r = chat(client, max_tokens=6, temperature=0.0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert r.system_fingerprint == REVISION and r.model == NAME


def test_greedy_equals_model_generate(server, client):
    engine = server["engine"]
    tok = engine.tokenizer
    ids = tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
    x = torch.tensor([tok(ids, add_special_tokens=False)["input_ids"]])
    out = engine.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=10)
    expected = tok.decode(out[0, x.shape[1] :], skip_special_tokens=True)
    assert chat(client, max_tokens=10, temperature=0.0).choices[0].message.content == expected


def test_seed_determinism_and_max_completion_tokens(client):
    a = chat(client, temperature=1.0, seed=7, max_completion_tokens=12).choices[0].message.content
    b = chat(client, temperature=1.0, seed=7, max_completion_tokens=12).choices[0].message.content
    c = chat(client, temperature=1.0, seed=8, max_completion_tokens=12).choices[0].message.content
    assert a == b != c


def test_top_k_and_min_p_are_accepted_and_honoured(client):
    greedy = chat(client, temperature=0.0, max_tokens=8).choices[0].message.content
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = chat(client, temperature=1.5, seed=3, max_tokens=8, extra_body=extra)
        assert r.choices[0].message.content == greedy, extra


def test_chat_template_kwargs_reach_the_template(client):
    on = chat(client, max_tokens=1, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    off = chat(client, max_tokens=1, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    # the no-thinking generation prompt appends an empty "<think>\n\n</think>\n\n" block
    assert off.usage.prompt_tokens > on.usage.prompt_tokens


def test_stop_sequence(client):
    full = chat(client, temperature=1.0, seed=11, max_tokens=20).choices[0].message.content
    i = next(i for i in range(len(full) // 3, len(full)) if len(full[i : i + 2].strip()) == 2)
    stop = full[i : i + 2]
    r = chat(client, temperature=1.0, seed=11, max_tokens=20, stop=stop)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == full[: full.find(stop)]


def test_streaming(client):
    expected = chat(client, temperature=0.0, max_tokens=8).choices[0].message.content
    chunks = list(
        chat(client, temperature=0.0, max_tokens=8, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"model": "other", "messages": MSGS}, "unknown model 'other'"),
        ({"model": NAME, "messages": []}, "'messages' must be a non-empty list"),
        ({"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": NAME, "messages": MSGS, "temperature": "hot"}, "'temperature' must be a number"),
        ({"model": NAME, "messages": MSGS, "n": 2}, "only n=1"),
        ({"model": NAME, "messages": MSGS, "max_tokens": 0}, "'max_tokens' must be >= 1"),
        ({"model": NAME, "messages": MSGS, "chat_template_kwargs": [1]}, "chat_template_kwargs"),
        ({"model": NAME, "messages": MSGS, "stop": [""]}, "'stop' strings must not be empty"),
    ],
)
def test_bad_requests_are_clear_400s(server, body, needle):
    r = httpx.post(server["url"] + "/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert needle in r.json()["error"]["message"]


def test_bad_json_and_openai_client_error(server, client):
    r = httpx.post(
        server["url"] + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="unknown model"):
        client.chat.completions.create(model="nope", messages=MSGS)


def test_request_log_has_one_line_per_request(server, client):
    chat(client, max_tokens=3, extra_headers={"X-Deepspec-Record": "rec-42#1"})
    lines = [json.loads(x) for x in server["log"].read_text().splitlines()]
    mine = [x for x in lines if x.get("record") == "rec-42#1"]
    assert len(mine) == 1
    assert (
        mine[0]["status"] == 200
        and mine[0]["completion_tokens"] == 3
        and mine[0]["finish_reason"] == "length"
    )
    assert mine[0]["prompt_tokens"] > 0 and "time" in mine[0]


def test_concurrent_requests_are_batched(tiny_model_dir):
    # A long gathering window and a batch size equal to the number of requests: the worker waits until
    # all six are queued, so they are generated in one batch whatever the arrival timing.
    engine = GenerationEngine(tiny_model_dir, device="cpu", max_batch_size=6, batch_wait_ms=30_000)
    app = create_app(engine, served_model_name=NAME)

    async def fire(url: str) -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0)
        calls = [
            aclient.chat.completions.create(model=NAME, messages=MSGS, temperature=1.0, seed=s, max_tokens=5)
            for s in range(6)
        ]
        return [r.choices[0].message.content for r in await asyncio.gather(*calls)]

    with serve_app(app) as url:
        answers = asyncio.run(fire(url))
    assert engine.stats["batches"] == 1 and engine.stats["max_batch"] == 6
    assert len(answers) == 6


def test_embedded_server_context_manager(tiny_model_dir):
    target = TargetConfig(model=tiny_model_dir, revision="r1", dtype="float32")
    with embedded_server(target, device="cpu") as base_url:
        assert base_url.endswith("/v1")
        c = openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0)
        name = c.models.list().data[0].id
        assert name == tiny_model_dir.rstrip("/").split("/")[-1]
        r = c.chat.completions.create(model=name, messages=MSGS, max_tokens=2)
        assert r.system_fingerprint == "r1" and r.usage.completion_tokens == 2
    with pytest.raises(httpx.ConnectError):
        httpx.get(base_url.removesuffix("/v1") + "/health", timeout=2)
