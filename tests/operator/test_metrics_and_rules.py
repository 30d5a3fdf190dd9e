"""/metrics exposition from resource status, and the chart's PrometheusRule under promtool."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_python.chart import Chart
from operator_harness import CHART
from prometheus_client.parser import text_string_to_metric_families

from deepspec.operator.metrics import OperatorMetrics

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus'; `make system-deps`)"
)

BODY = {
    "metadata": {"name": "qwen3-eagle3", "namespace": "llm"},
    "spec": {
        "target": {"model": "Qwen/Qwen3-8B", "revision": "v2"},
        "training": {"algorithm": "eagle3"},
        "evaluation": {"baselineAcceptLength": 3.0},
    },
    "status": {
        "phase": "Evaluating",
        "run": {"id": "abcd1234", "attempts": {"train": 1}},
        "results": {
            "macroAcceptLength": 3.05,
            "evaluatedAt": "2026-11-22T08:00:00Z",
            "benchmarks": {
                "gsm8k": {"tau": 3.2, "acceptance_ratio": 0.31, "n": 500},
                "mt-bench": {"tau": 2.9},
            },
        },
        "serving": {"runId": "00ff00ff", "targetRevision": "v1", "macroAcceptLength": 3.4},
    },
}


def scrape(metrics: OperatorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    port = metrics.serve(0, addr="127.0.0.1")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_endpoint_carries_status_figures() -> None:
    m = OperatorMetrics()
    m.store.put(BODY)
    m.reconciles.labels("ok").inc()
    m.errors.labels("llm", "qwen3-eagle3", "500").inc()
    got = scrape(m)
    key = (("name", "qwen3-eagle3"), ("namespace", "llm"))

    def val(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted([*key, *labels.items()])))]

    assert val("drafttraining_eval_accept_length", dataset="gsm8k") == pytest.approx(3.2)
    assert val("drafttraining_eval_accept_length", dataset="mt-bench") == pytest.approx(2.9)
    assert val("drafttraining_eval_acceptance_ratio", dataset="gsm8k") == pytest.approx(0.31)
    assert val("drafttraining_eval_macro_accept_length") == pytest.approx(3.05)
    assert val("drafttraining_baseline_accept_length") == pytest.approx(3.4)  # the serving draft's
    assert val("drafttraining_serving_accept_length") == pytest.approx(3.4)
    assert val("drafttraining_target_revision_mismatch") == 1.0  # v2 requested, v1 serving
    assert val("drafttraining_phase", phase="Evaluating") == 1.0
    assert val("drafttraining_phase", phase="Succeeded") == 0.0
    assert val("drafttraining_stage_retries", stage="train") == 1.0
    assert val("drafttraining_eval_timestamp_seconds") == pytest.approx(1795334400.0)
    info = [k for k in got if k[0] == "drafttraining_info"]
    assert dict(info[0][1])["target_revision"] == "v2" and dict(info[0][1])["algorithm"] == "eagle3"
    assert got[("drafttraining_reconcile_total", (("result", "ok"),))] == 1.0
    assert got[("drafttraining_reconcile_errors_total", (*key, ("reason", "500")))] == 1.0


def test_revision_match_and_removal() -> None:
    m = OperatorMetrics()
    body = yaml.safe_load(yaml.safe_dump(BODY))
    body["status"]["serving"]["targetRevision"] = "v2"
    m.store.put(body)
    got = scrape(m)
    assert (
        got[("drafttraining_target_revision_mismatch", (("name", "qwen3-eagle3"), ("namespace", "llm")))]
        == 0.0
    )
    m.store.remove("llm", "qwen3-eagle3")
    assert not [k for k in scrape(m) if k[0] == "drafttraining_info"]


def rule_groups(tmp_path: Path) -> Path:
    out = Chart.load(str(CHART)).render(
        {"metrics": {"prometheusRule": {"enabled": True}}}, name="ds", namespace="ops"
    )
    rule = yaml.safe_load(out["deepspec-operator/templates/prometheusrule.yaml"])
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return path


@needs_promtool
def test_promtool_check_rules(tmp_path: Path) -> None:
    res = subprocess.run(
        [PROMTOOL, "check", "rules", str(rule_groups(tmp_path))], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "6 rules found" in res.stdout + res.stderr


def _unit_test(rules: Path, tests: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    spec = {"rule_files": [rules.name], "evaluation_interval": "1m", "tests": tests}
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return subprocess.run(
        [PROMTOOL, "test", "rules", path.name], capture_output=True, text=True, cwd=tmp_path
    )


@needs_promtool
def test_promtool_drift_alerts(tmp_path: Path) -> None:
    rules = rule_groups(tmp_path)
    labels = 'namespace="llm", name="qwen3"'
    tests = [
        {  # eval drift: accepted length 2.7 against a 3.0 baseline (margin 0.1) fires after 5 min
            "interval": "1m",
            "input_series": [
                {"series": f"drafttraining_eval_macro_accept_length{{{labels}}}", "values": "3.1x5 2.7x20"},
                {"series": f"drafttraining_baseline_accept_length{{{labels}}}", "values": "3.0x25"},
            ],
            "alert_rule_test": [
                {"eval_time": "4m", "alertname": "DraftEvalAcceptLengthBelowBaseline", "exp_alerts": []},
                {
                    "eval_time": "15m",
                    "alertname": "DraftEvalAcceptLengthBelowBaseline",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "warning", "namespace": "llm", "name": "qwen3"},
                            "exp_annotations": {
                                "summary": "Draft llm/qwen3 evaluates below its baseline",
                                "description": "Macro accepted length 2.70 is below the baseline minus the margin.",
                            },
                        }
                    ],
                },
            ],
        },
        {  # live drift: SGLang accepted length falls from 3.2 to 2.2 after 8 h
            "interval": "5m",
            "input_series": [
                {
                    "series": 'sglang:spec_accept_length{namespace="llm", model_name="qwen3-8b", pod="a"}',
                    "values": "3.2x96 2.2x24",
                },
            ],
            "alert_rule_test": [
                {"eval_time": "7h", "alertname": "DraftLiveAcceptLengthDrop", "exp_alerts": []},
                {
                    "eval_time": "9h",
                    "alertname": "DraftLiveAcceptLengthDrop",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "namespace": "llm",
                                "model_name": "qwen3-8b",
                            },
                            "exp_annotations": {
                                "summary": "Live speculative accepted length of qwen3-8b dropped",
                                "description": "SGLang sglang:spec_accept_length fell below its 6 h average; the target "
                                "may have changed (check sglang:spec_accept_rate).",
                            },
                        }
                    ],
                },
            ],
        },
    ]
    res = _unit_test(rules, tests, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    # and the test would fail if the alert did not fire
    tests[0]["input_series"][0]["values"] = "3.1x25"
    assert _unit_test(rules, tests, tmp_path).returncode != 0
