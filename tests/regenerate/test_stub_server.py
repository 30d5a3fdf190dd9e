"""The raw multi-process stub server (test and benchmark tooling) drives a real regeneration."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from deepspec.testing.stub_server import free_port

from .conftest import prompts, read_jsonl, run_job, settings, write_records


def test_raw_stub_with_workers_serves_a_regeneration(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "requests.jsonl"
    cmd = [sys.executable, "-m", "deepspec.testing.stub_server", "--port", str(port), "--workers", "2"]
    cmd += ["--fail-rate", "0.3", "--fault-kinds", "500,drop", "--request-log", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "stub did not start"
                time.sleep(0.05)
        inp = write_records(tmp_path / "in.jsonl", prompts(30))
        summary = run_job(
            inp, tmp_path / "regen.jsonl", f"http://127.0.0.1:{port}", settings=settings(max_retries=6)
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert summary["ok"] == 30 and summary["retries"] > 0
    out = read_jsonl(tmp_path / "regen.jsonl")
    assert out[3]["messages"][-1]["content"].startswith("A1 to 'question number 3'")
    outcomes = {json.loads(line)["outcome"] for line in log.read_text().splitlines()}
    assert {"ok", "500", "drop"} <= outcomes
