"""Canary mode: a seeded prompt set through the official openai client to fake SGLang / vLLM servers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from monitor_fakes import EngineServer, FakeClock, chat_response

from deepspec.monitor.canary import CanaryError, CanaryRunner, load_canary_prompts, sample_from_response
from deepspec.monitor.drift import Baseline, DriftPolicy, DriftState
from deepspec.monitor.service import Monitor, MonitorLabels


def prompts_file(tmp_path: Path, n: int = 12) -> Path:
    path = tmp_path / "canary.jsonl"
    lines = [json.dumps({"turns": [f"question {i}?", "follow-up"]}) for i in range(n)]
    path.write_text("\n".join([*lines, "not json"]) + "\n")
    return path


def test_prompt_set_is_fixed_by_file_and_seed(tmp_path: Path) -> None:
    path = prompts_file(tmp_path)
    a = load_canary_prompts(path, 4, seed=7)
    assert a == load_canary_prompts(path, 4, seed=7)
    assert a != load_canary_prompts(path, 4, seed=8)
    assert len(a) == 4 and all(p.startswith("question ") for p in a)  # first user turn only
    with pytest.raises(CanaryError, match="not found"):
        load_canary_prompts(tmp_path / "nope.jsonl", 4, 0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": 1}\n')
    with pytest.raises(CanaryError, match="no usable"):
        load_canary_prompts(empty, 4, 0)


def sglang_chat(state: dict[str, Any]) -> Any:
    """SGLang's OpenAI answer: ``sglext.spec_tokens_details`` only when asked for (PR #33518)."""

    def chat(req: dict[str, Any]) -> dict[str, Any]:
        steps, acc = 40, state["accepted_per_step"]
        extra = {}
        if req.get("return_spec_tokens_details"):
            hist = [0, 0, 0, 0]
            hist[acc] = steps
            extra = {
                "sglext": {
                    "spec_tokens_details": {
                        "spec_verify_ct": steps,
                        "spec_num_correct_drafts": steps * acc,
                        "spec_num_proposed_drafts": steps * 3,
                        "spec_accept_length": 1 + acc,
                        "spec_correct_drafts_histogram": hist,
                    }
                }
            }
        return chat_response(req["model"], steps * (1 + acc), extra)

    return chat


def vllm_chat(req: dict[str, Any]) -> dict[str, Any]:
    # --per-request-spec-decode-metrics summary: 10 steps, histogram by accepted count (k = 3)
    spec = {
        "mean_acceptance_length": 2.5,
        "draft_acceptance_rate": 0.5,
        "acceptance_histogram": [2, 3, 3, 2],
        "num_spec_steps": 10,
        "num_accepted_draft_tokens": 15,
        "num_draft_tokens": 30,
        "num_spec_tokens": 3,
    }
    return chat_response(req["model"], 25, {"metrics": {"speculative_decoding": spec}})


def test_vllm_per_request_metrics_are_summed(tmp_path: Path) -> None:
    prompts = load_canary_prompts(prompts_file(tmp_path), 3, 0)
    with EngineServer(chat=vllm_chat) as srv:
        m = CanaryRunner("vllm", srv.url + "/v1", prompts, max_tokens=32).collect()
        sent = srv.requests
    assert m.reachable and m.speculating and m.sample is not None
    assert m.sample.verify_steps == 30 and m.sample.accepted_tokens == 45 and m.sample.draft_tokens == 90
    # position i accepted in the steps that accepted more than i tokens: 8, 5, 2 of 10
    assert m.sample.accepted_per_position == (24.0, 15.0, 6.0)
    assert [r["messages"][0]["content"] for r in sent] == prompts
    assert all(r["model"] == "served" and r["temperature"] == 0 and r["max_tokens"] == 32 for r in sent)
    assert not any("return_spec_tokens_details" in r for r in sent)  # vLLM: a server flag, not a field


def test_sglang_canary_follows_a_target_change_into_drift(tmp_path: Path) -> None:
    state = {"accepted_per_step": 2}
    prompts = load_canary_prompts(prompts_file(tmp_path), 4, 0)
    clock = FakeClock()
    policy = DriftPolicy(tolerance=0.1, duration_s=900, min_verify_steps=100)
    with EngineServer(chat=sglang_chat(state)) as srv:
        runner = CanaryRunner("sglang", srv.url + "/v1", prompts, model="qwen3-8b")
        labels = MonitorLabels("qwen3-8b", "run-7", "sglang", "canary")
        mon = Monitor(runner, labels, policy, window_s=300, baseline=Baseline(3.0, "run-7"), clock=clock)
        states = []
        for i in range(12):  # a canary run every 5 min; the target changes after the 4th
            if i == 4:
                state["accepted_per_step"] = 1
            states.append(mon.tick())
            clock.advance(300)
        assert all(r.get("return_spec_tokens_details") is True for r in srv.requests)
    assert [s.observed for s in states[:4]] == [3.0] * 4
    assert mon.stats is not None and mon.stats.position_acceptance == (1.0, 0.0, 0.0)
    assert mon.stats.acceptance_ratio == pytest.approx(1 / 3)
    # below from run 4 (t = 1200 s); drift once 900 s have passed (run 7), not before
    assert [s.drift for s in states] == [False] * 7 + [True] * 5
    assert states[5].state is DriftState.BELOW_BASELINE and states[5].observed == 2.0


def test_answers_without_statistics_are_missing_data(tmp_path: Path) -> None:
    prompts = load_canary_prompts(prompts_file(tmp_path), 2, 0)
    with EngineServer(chat=lambda req: chat_response(req["model"], 10, {})) as srv:
        m = CanaryRunner("vllm", srv.url + "/v1", prompts).collect()
    assert not m.reachable and "--per-request-spec-decode-metrics" in m.detail
    with EngineServer() as srv:  # every request fails (404)
        m = CanaryRunner("sglang", srv.url + "/v1", prompts, model="x").collect()
    assert not m.reachable and "every canary request failed" in m.detail


def test_response_shapes() -> None:
    # native meta_info of older SGLang builds: only spec_verify_ct -> completion_tokens / spec_verify_ct
    old = {"meta_info": {"spec_verify_ct": 10, "completion_tokens": 31}}
    s = sample_from_response(old)
    assert s is not None and 1 + s.accepted_tokens / s.verify_steps == pytest.approx(3.1)
    legacy = {"meta_info": {"spec_verify_ct": 4, "spec_accept_token_num": 6, "spec_draft_token_num": 12}}
    s = sample_from_response(legacy)
    assert s is not None and (s.accepted_tokens, s.draft_tokens) == (6, 12)
    non_spec = {"sglext": {"spec_tokens_details": {"spec_verify_ct": 0}}, "usage": {"completion_tokens": 5}}
    s = sample_from_response(non_spec)
    assert s is not None and s.empty
    assert sample_from_response({"choices": [], "usage": {"completion_tokens": 3}}) is None
