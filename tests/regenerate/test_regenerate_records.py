"""Acceptance 4 (rest): truncation policies, sharding + merge, multi-turn history, request contents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepspec.regenerate.shards import Shard, ShardError, merge_shards, shard_from_env
from deepspec.testing.stub_server import stub_answer

from .conftest import prompts, read_jsonl, run_job, settings, write_records


@pytest.mark.parametrize("policy", ["keep", "drop"])
def test_max_tokens_cut_is_truncated(tmp_path: Path, stub, policy: str) -> None:
    server = stub(answer_words=30)
    records = [
        {"id": "long", "messages": [{"role": "user", "content": "long"}]},
        {"id": "short", "messages": [{"role": "user", "content": "short"}]},
    ]
    inp = write_records(tmp_path / "in.jsonl", records)
    s = settings(truncated=policy, sampling={"max_tokens": 10})
    server.state.cfg.answer_words = 30
    summary = run_job(inp, tmp_path / "regen.jsonl", server.base_url, settings=s)
    out = read_jsonl(tmp_path / "regen.jsonl")
    assert [r["status"] for r in out] == ["truncated", "truncated"]
    assert out[0]["finish_reasons"] == ["length"]
    assert len(out[0]["messages"][-1]["content"].split()) == 10
    assert all(r["train"] is (policy == "keep") for r in out)
    assert summary["truncated"] == 2 and summary["excluded_from_training"] == (2 if policy == "drop" else 0)


def test_answer_within_max_tokens_is_ok(tmp_path: Path, stub) -> None:
    server = stub(answer_words=8)
    inp = write_records(tmp_path / "in.jsonl", prompts(3))
    summary = run_job(
        inp, tmp_path / "regen.jsonl", server.base_url, settings=settings(sampling={"max_tokens": 50})
    )
    assert summary["ok"] == 3 and summary["truncated"] == 0


def test_sharded_runs_merge_to_the_unsharded_output(tmp_path: Path, stub) -> None:
    server = stub()
    data = prompts(23)
    data[5] = "not json"  # a skipped record inside a shard
    inp = write_records(tmp_path / "in.jsonl", data)
    full = tmp_path / "full" / "regen.jsonl"
    run_job(inp, full, server.base_url)
    sharded = tmp_path / "sharded" / "regen.jsonl"
    for i in range(3):
        s = run_job(inp, sharded, server.base_url, shard=Shard(i, 3))
        assert s["input"] == len(range(i, 23, 3))
        assert (tmp_path / "sharded" / f"regen.shard-{i}-of-3.jsonl").exists()
    summary = merge_shards(sharded, 3, quiet=True)
    assert sharded.read_text() == full.read_text()
    assert summary["input"] == 23 and summary["skipped"] == 1 and summary["invariant_holds"]
    assert read_jsonl(tmp_path / "sharded" / "regen.errors.jsonl")[0]["line"] == 6


def test_merge_refuses_a_missing_shard(tmp_path: Path, stub) -> None:
    server = stub()
    inp = write_records(tmp_path / "in.jsonl", prompts(6))
    out = tmp_path / "regen.jsonl"
    run_job(inp, out, server.base_url, shard=Shard(0, 2))
    with pytest.raises(ShardError, match=r"shard 1/2 is missing"):
        merge_shards(out, 2, quiet=True)


def test_shard_from_kubernetes_env() -> None:
    assert shard_from_env({}) is None
    assert shard_from_env({"JOB_COMPLETION_INDEX": "2", "JOB_COMPLETIONS": "4"}) == Shard(2, 4)
    assert shard_from_env(
        {"JOB_COMPLETION_INDEX": "1", "DEEPSPEC_NUM_SHARDS": "3", "JOB_COMPLETIONS": "9"}
    ) == Shard(1, 3)
    with pytest.raises(ShardError, match="DEEPSPEC_NUM_SHARDS"):
        shard_from_env({"JOB_COMPLETION_INDEX": "1"})


def test_multi_turn_uses_regenerated_history(tmp_path: Path, stub) -> None:
    server = stub(keep_bodies=True)
    rec = {
        "id": "mt",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "ORIGINAL one"},
            {"role": "user", "content": "second question"},
            {"role": "assistant", "content": "ORIGINAL two"},
        ],
    }
    turns = {"id": "tt", "turns": ["a", "b", "c"]}
    inp = write_records(tmp_path / "in.jsonl", [rec, turns])
    run_job(inp, tmp_path / "regen.jsonl", server.base_url)
    out = {r["id"]: r for r in read_jsonl(tmp_path / "regen.jsonl")}

    msgs = out["mt"]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[2]["content"].startswith("A1 to 'first question'")
    assert msgs[4]["content"].startswith("A2 to 'second question'")
    assert "ORIGINAL" not in json.dumps(msgs)
    bodies = dict(server.state.bodies)
    second = bodies["mt#2"]["messages"]
    assert second[2] == {"role": "assistant", "content": msgs[2]["content"]}, (
        "turn 2 sees the regenerated turn 1"
    )
    assert out["mt"]["finish_reasons"] == ["stop", "stop"]
    assert [m["role"] for m in out["tt"]["messages"]] == ["user", "assistant"] * 3
    assert bodies["tt#1"]["messages"] == [{"role": "user", "content": "a"}], "no system prompt is injected"


def test_request_carries_sampling_template_kwargs_and_header(tmp_path: Path, stub) -> None:
    server = stub(keep_bodies=True, request_log=str(tmp_path / "log.jsonl"))
    inp = write_records(tmp_path / "in.jsonl", prompts(2))
    s = settings(
        thinking=False,
        chat_template_kwargs={"foo": 1},
        sampling={
            "temperature": 0.3,
            "top_p": 0.9,
            "top_k": 20,
            "min_p": 0.05,
            "max_tokens": 77,
            "seed": 100,
        },
    )
    run_job(inp, tmp_path / "regen.jsonl", server.base_url, settings=s, model="stub-model", revision="rev-1")
    body = dict(server.state.bodies)["r1#1"]
    assert body["temperature"] == 0.3 and body["top_p"] == 0.9 and body["max_tokens"] == 77
    assert body["top_k"] == 20 and body["min_p"] == 0.05 and body["seed"] == 101  # seed + record index
    assert body["chat_template_kwargs"] == {"foo": 1, "enable_thinking": False}
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sorted(e["key"] for e in log) == ["r0#1", "r1#1"]
    rec = read_jsonl(tmp_path / "regen.jsonl")[1]
    assert rec["messages"][-1]["content"] == stub_answer(body, server.cfg.answer_words)
    prov = rec["provenance"]
    assert prov["model"] == "stub-model" and prov["revision"] == "rev-1"
    assert prov["sampling"]["top_k"] == 20 and prov["chat_template_kwargs"]["enable_thinking"] is False
    assert prov["endpoints"] == [server.base_url]
    assert rec["usage"]["completion_tokens"] > 0
