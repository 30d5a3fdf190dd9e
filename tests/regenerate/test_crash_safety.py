"""Acceptance 2: SIGKILL mid-run, re-run: every id exactly once, finished records never re-sent."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from deepspec.regenerate.job import RegenerationError
from deepspec.regenerate.journal import load_journal

from .conftest import prompts, read_jsonl, regenerate_cmd, regenerate_env, run_job, settings, write_records

N = 60


def _journal_records(path: Path) -> int:
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)  # minus the header line
    except FileNotFoundError:
        return 0


def test_sigkill_then_resume(tmp_path: Path, stub) -> None:
    server = stub(latency_ms=50, request_log=str(tmp_path / "requests.jsonl"))
    inp = write_records(tmp_path / "in.jsonl", prompts(N))
    out = tmp_path / "out" / "regen.jsonl"
    journal = tmp_path / "out" / "regen.journal.jsonl"
    env = regenerate_env()

    proc = subprocess.Popen(regenerate_cmd(inp, out, server.base_url, 2), env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _journal_records(journal) < 10:  # part of the records journaled
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "no progress in the journal"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log_at_kill = len((tmp_path / "requests.jsonl").read_text().splitlines())
    _, finished = load_journal(journal)
    finished_ids = {r["id"] for r in finished.values()}
    assert 10 <= len(finished_ids) < N, "the kill must land mid-run"
    assert not out.exists(), "the output is only written at the end"

    rerun = subprocess.run(
        regenerate_cmd(inp, out, server.base_url, 2), env=env, capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stderr

    ids = [r["id"] for r in read_jsonl(out)]
    assert ids == [f"r{i}" for i in range(N)], "every id exactly once, in input order"
    log = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    resent = {e["key"].split("#")[0] for e in log[log_at_kill:]} & finished_ids
    assert not resent, f"finished records were sent again: {sorted(resent)}"
    sent_after = {e["key"].split("#")[0] for e in log[log_at_kill:]}
    assert sent_after >= {f"r{i}" for i in range(N)} - finished_ids
    summary = json.loads((tmp_path / "out" / "regen.summary.json").read_text())
    assert summary["ok"] == N and summary["invariant_holds"]
    assert summary["resumed_from_journal"] == len(finished_ids)


def test_torn_journal_tail_is_ignored(tmp_path: Path, stub) -> None:
    server = stub()
    inp = write_records(tmp_path / "in.jsonl", prompts(6))
    out = tmp_path / "regen.jsonl"
    run_job(inp, out, server.base_url)
    journal = tmp_path / "regen.journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    # keep the header and 3 records, then half of the 4th record (a write torn by SIGKILL)
    journal.write_bytes(b"".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    before = len(server.state.bodies) if server.cfg.keep_bodies else server.state.outcomes.total()
    summary = run_job(inp, out, server.base_url)
    assert summary["resumed_from_journal"] == 3
    assert server.state.outcomes.total() - before == 3
    assert [r["id"] for r in read_jsonl(out)] == [f"r{i}" for i in range(6)]
    _, entries = load_journal(journal)
    assert sorted(entries) == list(range(6))


def test_changed_settings_refuse_to_resume(tmp_path: Path, stub) -> None:
    server = stub()
    inp = write_records(tmp_path / "in.jsonl", prompts(4))
    out = tmp_path / "regen.jsonl"
    run_job(inp, out, server.base_url)
    with pytest.raises(
        RegenerationError, match=r"(?s)sampling.temperature: journal has 0.7, this run has 0.1.*--restart"
    ):
        run_job(inp, out, server.base_url, settings=settings(sampling={"temperature": 0.1}))
    write_records(inp, prompts(5))
    with pytest.raises(RegenerationError, match="input_sha256"):
        run_job(inp, out, server.base_url)
    summary = run_job(inp, out, server.base_url, restart=True)
    assert summary["ok"] == 5 and summary["resumed_from_journal"] == 0


def test_completed_run_resends_nothing(tmp_path: Path, stub) -> None:
    server = stub()
    inp = write_records(tmp_path / "in.jsonl", prompts(5))
    out = tmp_path / "regen.jsonl"
    run_job(inp, out, server.base_url)
    sent = server.state.outcomes.total()
    first = out.read_bytes()
    summary = run_job(inp, out, server.base_url)
    assert server.state.outcomes.total() == sent
    assert summary["resumed_from_journal"] == 5
    assert out.read_bytes() == first
