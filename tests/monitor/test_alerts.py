"""Acceptance 2 (the monitor's part): deepspec/monitor/alerts.yaml under ``promtool test rules``.

Every alert is shown firing, not firing, and silent when its data is missing.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deepspec.monitor import ALERT_RULES

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus'; `make system-deps`)"
)

MON = 'job="deepspec-monitor", model="qwen3-8b", draft_version="run-3", engine="sglang", mode="scrape"'
MON_LABELS = {
    "job": "deepspec-monitor",
    "model": "qwen3-8b",
    "draft_version": "run-3",
    "engine": "sglang",
    "mode": "scrape",
}
POD = 'namespace="llm", pod="serve-0", model_name="qwen3-8b"'


def state(name: str, values: str) -> dict[str, str]:
    return {"series": f'deepspec_monitor_state{{{MON}, state="{name}"}}', "values": values}


def mon(metric: str, values: str) -> dict[str, str]:
    return {"series": f"deepspec_monitor_{metric}{{{MON}}}", "values": values}


def healthy_clock(minutes: int) -> dict[str, str]:
    """last_success_timestamp_seconds keeping up with time (one measurement a minute)."""
    return mon("last_success_timestamp_seconds", f"0+60x{minutes}")


MONITOR_ALERTS = (
    "DraftLiveDrift",
    "DraftLiveMetricsMissing",
    "DraftLiveNotSpeculating",
    "DraftLiveAcceptLengthNearOne",
)
MISSING_ANNOTATIONS = {
    "summary": "No live speculative metrics for qwen3-8b (draft run-3)",
    "description": "deepspec monitor (sglang, scrape mode) gets no speculative-decoding metrics while speculation "
    "is configured; see its log for the reason (SGLang needs --enable-metrics; vLLM canaries need "
    "--per-request-spec-decode-metrics).",
}


def silent(alert: str, at: str = "60m") -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


TESTS: list[dict[str, Any]] = [
    {  # live drift: the monitor decides drift at 10m; the alert fires 2 min later with the ratio
        "name": "drift fires",
        "interval": "1m",
        "input_series": [
            mon("drift", "0x10 1x30"),
            mon("drift_ratio", "0.95x10 0.8x30"),
            healthy_clock(40),
            state("ok", "1x40"),
        ],
        "alert_rule_test": [
            silent("DraftLiveDrift", "5m"),  # below (0.95), no drift decided
            silent("DraftLiveDrift", "11m"),  # decided, `for` not over
            {
                "eval_time": "13m",
                "alertname": "DraftLiveDrift",
                "exp_alerts": [
                    {
                        "exp_labels": {**MON_LABELS, "severity": "warning"},
                        "exp_annotations": {
                            "summary": "Live accepted length of qwen3-8b (draft run-3) drifted below its baseline",
                            "description": "The windowed live accepted length is 80% of the baseline recorded when "
                            "the draft passed its gate, for longer than the monitor's drift duration. The target has "
                            "probably changed: retrain the draft (or let the operator's onDrift policy do it).",
                        },
                    }
                ],
            },
            silent("DraftLiveMetricsMissing", "30m"),
            silent("DraftLiveAcceptLengthNearOne", "30m"),
        ],
    },
    {  # missing data: no monitor series at all -> none of the monitor alerts fires
        "name": "no data",
        "interval": "1m",
        "input_series": [{"series": 'up{job="other"}', "values": "1x60"}],
        "alert_rule_test": [
            *[silent(a) for a in MONITOR_ALERTS],
            silent("VLLMSpecAcceptLengthNearOne"),
            silent("SGLangSpecAcceptLengthNearOne"),
        ],
    },
    {  # the monitor reports missing metrics (server down): MetricsMissing, never drift
        "name": "metrics missing",
        "interval": "1m",
        "input_series": [
            state("missing", "0x5 1x40"),
            mon("drift", "0x45"),
            mon("last_success_timestamp_seconds", "0+60x5 300x40"),
        ],
        "alert_rule_test": [
            silent("DraftLiveMetricsMissing", "14m"),
            {
                "eval_time": "16m",
                "alertname": "DraftLiveMetricsMissing",
                "exp_alerts": [
                    {
                        "exp_labels": {**MON_LABELS, "state": "missing", "severity": "warning"},
                        "exp_annotations": MISSING_ANNOTATIONS,
                    }
                ],
            },
            silent("DraftLiveDrift", "40m"),
        ],
    },
    {  # the monitor itself stops measuring (state stuck at ok, timestamp stale)
        "name": "stale monitor",
        "interval": "1m",
        "input_series": [state("missing", "0x60"), mon("last_success_timestamp_seconds", "0+60x10 600x50")],
        "alert_rule_test": [
            silent("DraftLiveMetricsMissing", "20m"),  # 10 min stale, threshold 15
            {
                "eval_time": "40m",
                "alertname": "DraftLiveMetricsMissing",
                "exp_alerts": [
                    {
                        "exp_labels": {**MON_LABELS, "severity": "warning"},
                        "exp_annotations": MISSING_ANNOTATIONS,
                    }
                ],
            },
        ],
    },
    {  # healthy: nothing fires
        "name": "healthy",
        "interval": "1m",
        "input_series": [
            state("ok", "1x60"),
            state("missing", "0x60"),
            state("no_speculation", "0x60"),
            state("broken", "0x60"),
            mon("drift", "0x60"),
            mon("accept_length", "3.1x60"),
            healthy_clock(60),
        ],
        "alert_rule_test": [silent(a) for a in MONITOR_ALERTS],
    },
    {  # no speculation on the server
        "name": "not speculating",
        "interval": "1m",
        "input_series": [state("no_speculation", "1x30"), healthy_clock(30)],
        "alert_rule_test": [
            silent("DraftLiveNotSpeculating", "5m"),
            {
                "eval_time": "15m",
                "alertname": "DraftLiveNotSpeculating",
                "exp_alerts": [
                    {
                        "exp_labels": {**MON_LABELS, "state": "no_speculation", "severity": "warning"},
                        "exp_annotations": {
                            "summary": "qwen3-8b serves without speculative decoding",
                            "description": "The server answers, but SGLang reports sglang:spec_accept_length 0 / "
                            "vLLM exports no vllm:spec_decode_* series: the draft is not configured or failed to load.",
                        },
                    }
                ],
            },
            silent("DraftLiveDrift", "15m"),
        ],
    },
    {  # accepted length near 1.0: broken, critical, with the value
        "name": "broken draft",
        "interval": "1m",
        "input_series": [
            state("broken", "0x3 1x30"),
            mon("accept_length", "1.03x33"),
            mon("drift", "0x33"),
            healthy_clock(33),
        ],
        "alert_rule_test": [
            silent("DraftLiveAcceptLengthNearOne", "6m"),
            {
                "eval_time": "10m",
                "alertname": "DraftLiveAcceptLengthNearOne",
                "exp_alerts": [
                    {
                        "exp_labels": {**MON_LABELS, "severity": "critical"},
                        "exp_annotations": {
                            "summary": "Draft run-3 of qwen3-8b is rejected almost always",
                            "description": "Live accepted length 1.03 is near 1.0: speculation costs time and gains "
                            "nothing. Check that the draft loaded and that its vocabulary mapping matches the target; "
                            "this is a broken deployment, not a drift.",
                        },
                    }
                ],
            },
            silent("DraftLiveDrift", "20m"),
        ],
    },
    {  # vLLM counters: 5 accepted per 100 drafts -> 1.05; a healthy pod with a counter reset stays silent
        "name": "vllm near one",
        "interval": "1m",
        "input_series": [
            {"series": f'vllm:spec_decode_num_drafts_total{{{POD}, engine="0"}}', "values": "0+100x60"},
            {
                "series": f'vllm:spec_decode_num_accepted_tokens_total{{{POD}, engine="0"}}',
                "values": "0+5x60",
            },
            {
                "series": 'vllm:spec_decode_num_drafts_total{namespace="llm", pod="serve-1", model_name="qwen3-8b", engine="0"}',
                "values": "0+100x30 0+100x30",
            },
            {
                "series": 'vllm:spec_decode_num_accepted_tokens_total{namespace="llm", pod="serve-1", model_name="qwen3-8b", engine="0"}',
                "values": "0+200x30 0+200x30",
            },
            {  # idle pod: flat counters (0/0) never fire
                "series": 'vllm:spec_decode_num_drafts_total{namespace="llm", pod="idle", model_name="qwen3-8b", engine="0"}',
                "values": "500x60",
            },
            {
                "series": 'vllm:spec_decode_num_accepted_tokens_total{namespace="llm", pod="idle", model_name="qwen3-8b", engine="0"}',
                "values": "5x60",
            },
        ],
        "alert_rule_test": [
            silent("VLLMSpecAcceptLengthNearOne", "10m"),
            {
                "eval_time": "40m",
                "alertname": "VLLMSpecAcceptLengthNearOne",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "namespace": "llm",
                            "pod": "serve-0",
                            "model_name": "qwen3-8b",
                            "severity": "critical",
                        },
                        "exp_annotations": {
                            "summary": "vLLM qwen3-8b: speculative accepted length 1.05",
                            "description": "Over 15 minutes of traffic almost every draft token was rejected "
                            "(1 + accepted / drafts < 1.1): check the draft and its vocabulary mapping.",
                        },
                    }
                ],
            },
        ],
    },
    {  # SGLang gauge near 1 under traffic fires; a stale gauge (idle) and 0 (no speculation) do not
        "name": "sglang near one",
        "interval": "1m",
        "input_series": [
            {"series": f'sglang:spec_accept_length{{{POD}, tp_rank="0"}}', "values": "1.02x60"},
            {"series": f'sglang:spec_accept_length{{{POD}, tp_rank="1"}}', "values": "1.04x60"},
            {"series": f"sglang:generation_tokens_total{{{POD}}}", "values": "0+500x60"},
            {
                "series": 'sglang:spec_accept_length{namespace="llm", pod="idle", model_name="qwen3-8b", tp_rank="0"}',
                "values": "1.02x60",
            },
            {
                "series": 'sglang:generation_tokens_total{namespace="llm", pod="idle", model_name="qwen3-8b"}',
                "values": "900x60",
            },
            {
                "series": 'sglang:spec_accept_length{namespace="llm", pod="plain", model_name="qwen3-8b", tp_rank="0"}',
                "values": "0x60",
            },
            {
                "series": 'sglang:generation_tokens_total{namespace="llm", pod="plain", model_name="qwen3-8b"}',
                "values": "0+500x60",
            },
        ],
        "alert_rule_test": [
            silent("SGLangSpecAcceptLengthNearOne", "10m"),
            {
                "eval_time": "40m",
                "alertname": "SGLangSpecAcceptLengthNearOne",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "namespace": "llm",
                            "pod": "serve-0",
                            "model_name": "qwen3-8b",
                            "severity": "critical",
                        },
                        "exp_annotations": {  # the mean of the two tensor-parallel ranks' gauges
                            "summary": "SGLang qwen3-8b: speculative accepted length 1.03",
                            "description": "sglang:spec_accept_length stayed near 1.0 under traffic: almost every "
                            "draft token is rejected. Check the draft and its vocabulary mapping (0 would mean no "
                            "speculation at all).",
                        },
                    }
                ],
            },
        ],
    },
]


def promtool_test(tmp_path: Path, tests: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    shutil.copy(ALERT_RULES, tmp_path / "alerts.yaml")
    spec = {"rule_files": ["alerts.yaml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, "test", "rules", "tests.yaml"], capture_output=True, text=True, cwd=tmp_path
    )


@needs_promtool
def test_rules_are_valid_and_every_alert_is_tested(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    res = subprocess.run([PROMTOOL, "check", "rules", str(ALERT_RULES)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    alerts = {r["alert"] for g in yaml.safe_load(ALERT_RULES.read_text())["groups"] for r in g["rules"]}
    fired = {a["alertname"] for t in TESTS for a in t["alert_rule_test"] if a["exp_alerts"]}
    assert fired == alerts  # every alert has a firing case (and the "no data" test covers all of them)


@needs_promtool
def test_promtool_alert_unit_tests(tmp_path: Path) -> None:
    res = promtool_test(tmp_path, TESTS)
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_the_unit_tests_catch_a_rule_that_does_not_fire(tmp_path: Path) -> None:
    broken = copy.deepcopy(TESTS)
    broken[0]["input_series"][0]["values"] = "0x40"  # the monitor never decides drift
    res = promtool_test(tmp_path, broken)
    assert res.returncode != 0 and "DraftLiveDrift" in res.stdout + res.stderr
