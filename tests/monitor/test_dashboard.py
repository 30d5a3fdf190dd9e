"""deepspec/monitor/dashboard.json: every query is valid PromQL (promtool) and reads metrics the
monitor or the engines really export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from monitor_fakes import FakeClock, FakeSGLang, FakeVLLM
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from deepspec.monitor import DASHBOARD
from deepspec.monitor.drift import Baseline, DriftPolicy
from deepspec.monitor.scrape import Measurement
from deepspec.monitor.service import Monitor, MonitorCollector, MonitorLabels
from deepspec.monitor.window import AcceptanceSample

PROMTOOL = shutil.which("promtool")
NAME = re.compile(r"\b(deepspec_monitor_\w+|vllm:\w+|sglang:\w+)")


def queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def exported_sample_names() -> set[str]:
    class One:
        def collect(self) -> Measurement:
            return Measurement(AcceptanceSample(10, 20, 30, (10.0, 6.0, 4.0)), speculating=True)

    mon = Monitor(
        One(), MonitorLabels("m", "d", "vllm", "scrape"), DriftPolicy(), 600, Baseline(3.0), clock=FakeClock()
    )
    mon.tick()
    reg = CollectorRegistry()
    reg.register(MonitorCollector(mon))
    texts = [generate_latest(reg).decode(), FakeVLLM().metrics(), FakeSGLang().metrics()]
    return {s.name for t in texts for fam in text_string_to_metric_families(t) for s in fam.samples}


def test_dashboard_reads_exported_metrics() -> None:
    exported = exported_sample_names()
    used = {n for q in queries() for n in NAME.findall(q)}
    assert used and used <= exported, used - exported
    assert {"deepspec_monitor_accept_length", "deepspec_monitor_baseline_accept_length",
            "deepspec_monitor_position_acceptance"} <= used  # fmt: skip


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (`make system-deps`)")
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query_{i}", "expr": q.replace("$namespace", ".*").replace("$model", ".*")}
        for i, q in enumerate(queries())
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)  # type: ignore[list-item]
    assert res.returncode == 0, res.stdout + res.stderr
