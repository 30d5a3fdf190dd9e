"""``deepspec monitor`` as a program: it scrapes a fake vLLM and exports its gauges on /metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from monitor_fakes import EngineServer, FakeVLLM
from prometheus_client.parser import text_string_to_metric_families

from deepspec.cli import main


def read_metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_cli_exports_live_gauges_on_its_metrics_endpoint(tmp_path: Path) -> None:
    fake = FakeVLLM()

    def metrics() -> str:  # traffic between scrapes: 2 of 3 drafts accepted per step, accept length 3.0
        fake.serve_steps(50, 2)
        return fake.metrics()

    baseline = tmp_path / "summary.json"
    baseline.write_text(json.dumps({"macro_accept_length": 3.6}))
    with EngineServer(metrics=metrics) as srv:
        cmd = [
            sys.executable, "-m", "deepspec", "monitor", "--engine", "vllm",
            "--metrics-url", f"{srv.url}/metrics", "--served-model", "qwen3-8b", "--draft-version", "run-3",
            "--baseline-file", str(baseline), "--min-verify-steps", "50", "--window", "1h",
            "--scrape-every", "0.2", "--listen", "127.0.0.1:0",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert "metrics on http://127.0.0.1:" in first, first
            url = first.split()[-1]
            key = (("draft_version", "run-3"), ("engine", "vllm"), ("mode", "scrape"), ("model", "qwen3-8b"))
            deadline = time.monotonic() + 30
            got: dict = {}
            while time.monotonic() < deadline:
                got = read_metrics(url)
                if (("deepspec_monitor_accept_length", key)) in got:
                    break
                time.sleep(0.1)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    assert got[("deepspec_monitor_accept_length", key)] == pytest.approx(3.0)
    assert got[("deepspec_monitor_acceptance_ratio", key)] == pytest.approx(2 / 3)
    assert got[("deepspec_monitor_position_acceptance", (*key, ("position", "0")))] == pytest.approx(1.0)
    assert got[("deepspec_monitor_position_acceptance", (*key, ("position", "2")))] == pytest.approx(0.0)
    assert got[("deepspec_monitor_baseline_accept_length", key)] == pytest.approx(3.6)
    assert got[("deepspec_monitor_drift_ratio", key)] == pytest.approx(3.0 / 3.6)
    assert got[("deepspec_monitor_drift", key)] == 0.0  # below, but not for 15 min yet
    assert got[("deepspec_monitor_state", (*key, ("state", "below_baseline")))] == 1.0
    assert got[("deepspec_monitor_state", (*key, ("state", "drift")))] == 0.0
    assert got[("deepspec_monitor_window_verify_steps", key)] >= 50
    assert got[("deepspec_monitor_measurements_total", key)] >= 2


def test_cli_once_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with EngineServer(metrics=FakeVLLM().metrics) as srv:
        rc = main(
            [
                "monitor",
                "--engine",
                "vllm",
                "--metrics-url",
                f"{srv.url}/metrics",
                "--once",
                "--baseline",
                "3",
            ]
        )
    assert rc == 0
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status["state"] == "insufficient_data" and status["baseline"] == 3.0
    assert main(["monitor", "--engine", "sglang"]) == 2
    assert "--metrics-url" in capsys.readouterr().err
    assert main(["monitor", "--engine", "vllm", "--mode", "canary", "--base-url", "http://x/v1"]) == 2
    assert "--prompts" in capsys.readouterr().err
    assert main(["monitor", "--engine", "vllm", "--metrics-url", "u", "--tolerance", "2", "--once"]) == 2
    assert "tolerance" in capsys.readouterr().err
