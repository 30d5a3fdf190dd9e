"""/metrics exposition from resource status, and the chart's PrometheusRule under promtool."""

from __future__ import annotations

import importlib.util
import json
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
    assert "13 rules found" in res.stdout + res.stderr  # 7 operator alerts + deepspec/monitor/alerts.yaml


def _unit_test(
    rules: Path, tests: list[dict[str, Any]], tmp_path: Path, evaluation_interval: str = "1m"
) -> subprocess.CompletedProcess[str]:
    spec = {"rule_files": [rules.name], "evaluation_interval": evaluation_interval, "tests": tests}
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


def series_of(body: dict[str, Any]) -> dict[str, float]:
    """``name{labels}`` -> value of the drafttraining_* gauges the operator exports for ``body``."""
    m = OperatorMetrics()
    m.store.put(body)
    out = {}
    for (name, labels), value in scrape(m).items():
        if name.startswith("drafttraining_") and not name.endswith(("_total", "_created")):
            text = ", ".join(f'{k}="{v}"' for k, v in labels)
            out[f"{name}{{{text}}}"] = value
    return out


def as_input(series: dict[str, float], samples: int, phases: bool = True) -> list[dict[str, str]]:
    """promtool input series (``phases=False`` leaves out the per-phase gauges: faster long tests)."""
    return [
        {"series": k, "values": f"{v:g}x{samples}"}
        for k, v in series.items()
        if phases or not k.startswith(("drafttraining_phase", "drafttraining_info"))
    ]


FIRST_RUN = {  # a first run, 8 days in: nothing serves yet
    "metadata": {"name": "qwen3", "namespace": "llm"},
    "spec": {"target": {"model": "Qwen/Qwen3-8B", "revision": "v1"}, "training": {"algorithm": "eagle3"}},
    "status": {"phase": "Training", "run": {"id": "aaaa1111", "startedAt": "1970-01-01T00:00:00Z"}},
}
HEALTHY = {  # evaluated and serving on the requested revision, nothing changed since
    "metadata": {"name": "qwen3", "namespace": "llm"},
    "spec": {"target": {"model": "Qwen/Qwen3-8B", "revision": "v1"}, "training": {"algorithm": "eagle3"}},
    "status": {
        "phase": "Succeeded",
        "run": {"id": "aaaa1111", "startedAt": "1970-01-01T00:00:00Z"},
        "results": {"runId": "aaaa1111", "macroAcceptLength": 3.2, "evaluatedAt": "1970-01-01T12:00:00Z"},
        "serving": {"runId": "aaaa1111", "targetRevision": "v1", "macroAcceptLength": 3.2},
    },
}


def _status(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = yaml.safe_load(yaml.safe_dump(body))
    for dotted, value in changes.items():
        node = out
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


SUMMARIES = {
    "DraftTargetRevisionNotEvaluated": "llm/qwen3: target revision changed, no draft evaluated on it yet",
    "DraftEvalStale": "llm/qwen3: the current run has not been evaluated for a long time",
    "DraftTrainingStalled": "llm/qwen3 is Stalled (kubectl describe dt qwen3)",
    "DraftLiveAcceptRateDrop": "Live speculative acceptance rate of qwen3-8b dropped",
    "DraftServingOlderThanTarget": "llm/qwen3: the serving draft is older than the target revision",
    "DraftEvalAcceptLengthBelowBaseline": "Draft llm/qwen3 evaluates below its baseline",
    "DraftLiveAcceptLengthDrop": "Live speculative accepted length of qwen3-8b dropped",
}


def _alert(name: str, at: str, fires: list[dict[str, str]] | None) -> dict[str, Any]:
    expected = [{"exp_labels": lbl, "exp_annotations": {"summary": SUMMARIES[name]}} for lbl in (fires or [])]
    return {"eval_time": at, "alertname": name, "exp_alerts": expected}


KEY = {"namespace": "llm", "name": "qwen3"}
OPERATOR_ALERTS = (
    "DraftEvalAcceptLengthBelowBaseline", "DraftLiveAcceptLengthDrop", "DraftLiveAcceptRateDrop",
    "DraftTargetRevisionNotEvaluated", "DraftTrainingStalled", "DraftEvalStale", "DraftServingOlderThanTarget",
)  # fmt: skip


def alert_cases() -> list[dict[str, Any]]:
    """One promtool test group per alert behaviour; series from the operator's own /metrics."""
    stalled = _status(HEALTHY, status__phase="Stalled")
    bumped = _status(HEALTHY, spec__target__revision="v2", status__run__id="bbbb2222")
    stale = _status(FIRST_RUN)  # 8 days into a run that never got evaluated
    # the run on v2 was evaluated but its draft did not beat the serving one (v1) on v2: kept
    not_promoted = _status(HEALTHY, spec__target__revision="v2", status__phase="GateFailed",
                           status__run__id="bbbb2222", status__results__runId="bbbb2222")  # fmt: skip
    live = 'sglang:spec_accept_length{namespace="llm", model_name="qwen3-8b", pod="%s"}'
    rate = 'sglang:spec_accept_rate{namespace="llm", model_name="qwen3-8b", pod="%s"}'
    live_labels = {"severity": "warning", "namespace": "llm", "model_name": "qwen3-8b"}
    return [
        # DraftTargetRevisionNotEvaluated: fires after a revision bump; not during a first run (8 days)
        {"interval": "5m", "input_series": as_input(series_of(bumped), 100),
         "alert_rule_test": [_alert("DraftTargetRevisionNotEvaluated", "7h", [{"severity": "warning", **KEY}])]},
        {"interval": "15m", "input_series": as_input(series_of(FIRST_RUN), 800, phases=False),
         "alert_rule_test": [_alert("DraftTargetRevisionNotEvaluated", "8d", None)]},
        # DraftServingOlderThanTarget: the new draft was not promoted (or retrain is manual): fires after
        # 30 min, and then "not evaluated" is silent; never during the retrain itself nor when current
        {"interval": "5m", "input_series": as_input(series_of(not_promoted), 100),
         "alert_rule_test": [_alert("DraftServingOlderThanTarget", "20m", None),
                             _alert("DraftServingOlderThanTarget", "1h", [{"severity": "warning", **KEY}]),
                             _alert("DraftTargetRevisionNotEvaluated", "7h", None)]},
        {"interval": "5m", "input_series": as_input(series_of(bumped), 100),
         "alert_rule_test": [_alert("DraftServingOlderThanTarget", "7h", None)]},
        {"interval": "5m", "input_series": as_input(series_of(HEALTHY), 100),
         "alert_rule_test": [_alert("DraftServingOlderThanTarget", "7h", None)]},
        # missing data: no drafttraining_* / engine series at all: no alert of the operator's group
        {"interval": "5m", "input_series": [{"series": 'up{job="other"}', "values": "1x100"}],
         "alert_rule_test": [_alert(a, "7h", None) for a in OPERATOR_ALERTS]},
        # DraftEvalStale: not on a healthy resource after 8 days; fires when the run is unevaluated for 8 days
        {"interval": "15m", "input_series": as_input(series_of(HEALTHY), 800, phases=False),
         "alert_rule_test": [_alert("DraftEvalStale", "8d", None)]},
        {"interval": "15m", "input_series": as_input(series_of(stale), 800, phases=False),
         "alert_rule_test": [_alert("DraftEvalStale", "6d", None),
                             _alert("DraftEvalStale", "8d", [{"severity": "info", **KEY}])]},
        # DraftTrainingStalled: after 15 minutes in Stalled; never for Succeeded
        {"interval": "5m", "input_series": as_input(series_of(stalled), 10),
         "alert_rule_test": [_alert("DraftTrainingStalled", "10m", None),
                             _alert("DraftTrainingStalled", "30m", [{"severity": "critical", "phase": "Stalled", **KEY}])]},
        {"interval": "5m", "input_series": as_input(series_of(HEALTHY), 10),
         "alert_rule_test": [_alert("DraftTrainingStalled", "30m", None)]},
        # live alerts: a non-speculative server (regeneration) joining with accept length 0 fires nothing
        {"interval": "5m", "input_series": [
            {"series": live % "serving", "values": "3.2x130"},
            {"series": live % "regen", "values": "_x102 0x28"},  # starts at 8.5 h
            {"series": rate % "serving", "values": "0.6x130"},
            {"series": rate % "regen", "values": "_x102 0x28"}],
         "alert_rule_test": [_alert("DraftLiveAcceptLengthDrop", "9h15m", None),
                             _alert("DraftLiveAcceptRateDrop", "9h15m", None)]},
        # ... and a real drop of the acceptance rate fires
        {"interval": "5m", "input_series": [{"series": rate % "serving", "values": "0.6x96 0.3x24"}],
         "alert_rule_test": [_alert("DraftLiveAcceptRateDrop", "9h", [live_labels])]},
    ]  # fmt: skip


@needs_promtool
def test_promtool_each_alert(tmp_path: Path) -> None:
    rules = rule_groups(tmp_path)
    cases = alert_cases()
    long = [c for c in cases if c["interval"] == "15m"]  # days of data: a coarser evaluation step
    res = _unit_test(rules, [c for c in cases if c not in long], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    res = _unit_test(rules, long, tmp_path, evaluation_interval="15m")
    assert res.returncode == 0, res.stdout + res.stderr
    # every alert of the chart is covered: the operator's here (the drift ones fire in
    # test_promtool_drift_alerts), the monitor's group by test_promtool_monitor_group_in_the_chart
    names = {t["alertname"] for c in cases for t in c["alert_rule_test"]}
    groups = yaml.safe_load(rules.read_text())["groups"]
    operator_group = next(g for g in groups if g["name"] == "deepspec.drafts")
    assert {r["alert"] for r in operator_group["rules"]} == names == set(OPERATOR_ALERTS)
    assert [g["name"] for g in groups] == ["deepspec.drafts", "deepspec.live"]


def test_chart_carries_the_monitor_alerts_and_dashboard(tmp_path: Path) -> None:
    """The chart's copies are the package's (regenerate with `deepspec operator crd --write`)."""
    from deepspec.monitor import ALERT_RULES, DASHBOARD
    from deepspec.operator.crd import REPO_ROOT, chart_monitoring_files

    for rel, text in chart_monitoring_files().items():
        assert (REPO_ROOT / rel).read_text(encoding="utf-8") == text, (
            f"{rel} is stale: deepspec operator crd --write"
        )
    groups = yaml.safe_load(rule_groups(tmp_path).read_text())["groups"]
    assert groups[1:] == yaml.safe_load(ALERT_RULES.read_text())["groups"]
    out = Chart.load(str(CHART)).render(
        {"metrics": {"grafanaDashboard": {"enabled": True}}}, name="ds", namespace="ops"
    )
    data = yaml.safe_load(out["deepspec-operator/templates/dashboard.yaml"])["data"]
    assert json.loads(data["deepspec-monitor.json"]) == json.loads(DASHBOARD.read_text())
    assert json.loads(data["deepspec-drafts.json"])["panels"]


@needs_promtool
def test_promtool_monitor_group_in_the_chart(tmp_path: Path) -> None:
    """tests/monitor/test_alerts.py's cases (each monitor alert firing, silent, and with missing data)
    pass against the chart's rendered PrometheusRule too."""
    spec = importlib.util.spec_from_file_location(
        "monitor_alert_cases", Path(__file__).parents[1] / "monitor" / "test_alerts.py"
    )
    assert spec is not None and spec.loader is not None
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    res = _unit_test(rule_groups(tmp_path), cases.TESTS, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_promtool_cases_are_not_vacuous(tmp_path: Path) -> None:
    """The old expressions (before the fixes) fail these cases: the tests can see the bugs."""
    rules = rule_groups(tmp_path)
    groups = yaml.safe_load(rules.read_text())
    for rule in groups["groups"][0]["rules"]:
        if rule["alert"].startswith("DraftLive"):
            old = rule["expr"].replace("]) > 0)", "]))").replace("offset 1h) > 0)", "offset 1h))")
            assert old != rule["expr"]
            rule["expr"] = old
        if rule["alert"] == "DraftEvalStale":  # the old "no evaluation for 7 days" rule
            rule["expr"] = "time() - drafttraining_eval_timestamp_seconds > 604800"
    rules.write_text(yaml.safe_dump(groups))
    zero_server = [c for c in alert_cases() if any("regen" in s["series"] for s in c["input_series"])]
    assert _unit_test(rules, zero_server, tmp_path).returncode != 0
    healthy = [c for c in alert_cases() if c["interval"] == "15m"][1:2]
    assert healthy[0]["alert_rule_test"][0]["alertname"] == "DraftEvalStale"
    assert _unit_test(rules, healthy, tmp_path, evaluation_interval="15m").returncode != 0
    # a mismatch gauge that ignored "nothing serves yet" would fire during a first run
    first_run = series_of(FIRST_RUN)
    key = next(k for k in first_run if k.startswith("drafttraining_target_revision_mismatch"))
    assert first_run[key] == 0.0
    assert series_of(_status(FIRST_RUN, status__serving={"runId": "x", "targetRevision": "v0"}))[key] == 1.0
