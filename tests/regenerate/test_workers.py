"""`deepspec regenerate --workers N`: same output as one process; resume after SIGKILL of the parent
or of a worker, with every id exactly once and finished records never re-sent."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from deepspec.regenerate.job import RegenerationError
from deepspec.regenerate.journal import JournalWriter, load_journal
from deepspec.regenerate.shards import OutputPaths, Shard
from deepspec.regenerate.workers import auto_workers, chunk_size, concurrency_share, fold, worker_journals

from .conftest import prompts, read_jsonl, regenerate_cmd, regenerate_env, run_job, settings, write_records

N = 60


def test_workers_output_equals_one_process(tmp_path: Path, stub) -> None:
    server = stub(fail_rate=0.2, fault_kinds=("500", "drop"))
    data = prompts(41)
    data[7] = "not json"  # a skipped record handled by the parent
    data[20] = {"id": "mt", "turns": ["first", "second"]}  # multi-turn: history inside one worker
    inp = write_records(tmp_path / "in.jsonl", data)
    one = run_job(inp, tmp_path / "one" / "regen.jsonl", server.base_url)
    server.state.attempts.clear()  # the same faults again for the second run
    three = run_job(inp, tmp_path / "three" / "regen.jsonl", server.base_url, workers=3)
    assert (tmp_path / "three" / "regen.jsonl").read_bytes() == (
        tmp_path / "one" / "regen.jsonl"
    ).read_bytes()
    assert (tmp_path / "three" / "regen.errors.jsonl").read_bytes() == (
        tmp_path / "one" / "regen.errors.jsonl"
    ).read_bytes()
    assert three["workers"] == 3 and one["workers"] == 1
    for key in ("ok", "skipped", "error", "input", "invariant_holds"):
        assert three[key] == one[key]
    assert three["skipped"] == 1 and three["ok"] == 40
    assert three["requests"] >= 41 and three["retries"] >= 1  # statistics come back from the workers
    # the throughput window spans all three workers' windows; how unevenly they started/ended is reported
    assert one["send_start_spread_s"] == one["send_end_spread_s"] == 0.0
    assert 0.0 <= three["send_start_spread_s"] < three["send_s"]
    assert 0.0 <= three["send_end_spread_s"] < three["send_s"]
    assert not worker_journals(OutputPaths(tmp_path / "three" / "regen.jsonl")), "worker journals folded"


def test_workers_inside_a_shard(tmp_path: Path, stub) -> None:
    server = stub()
    inp = write_records(tmp_path / "in.jsonl", prompts(20))
    s = run_job(inp, tmp_path / "regen.jsonl", server.base_url, shard=Shard(1, 2), workers=2)
    out = read_jsonl(tmp_path / "regen.shard-1-of-2.jsonl")
    assert [r["index"] for r in out] == list(range(1, 20, 2)) and s["ok"] == 10


def _cmd(inp: Path, out: Path, url: str, workers: int) -> list[str]:
    return regenerate_cmd(inp, out, url, 4, "--workers", str(workers))


def _journaled(paths: OutputPaths) -> int:
    n = 0
    for p in [paths.journal, *worker_journals(paths)]:
        with contextlib.suppress(FileNotFoundError):
            n += max(0, p.read_bytes().count(b"\n") - 1)  # minus the header line
    return n


def _wait_for(paths: OutputPaths, proc: subprocess.Popen, records: int) -> None:
    deadline = time.monotonic() + 60
    while _journaled(paths) < records:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "no progress in the journals"
        time.sleep(0.005)


def _workers_gone(paths: OutputPaths) -> None:
    """Every worker journal's lock can be taken: no worker process is alive any more."""
    import fcntl

    deadline = time.monotonic() + 10
    for p in worker_journals(paths):
        with open(p, "rb") as f:
            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"a worker still holds {p}"
                    time.sleep(0.01)


def _finished_ids(paths: OutputPaths) -> set[str]:
    ids: set[str] = set()
    for p in [paths.journal, *worker_journals(paths)]:
        _, entries = load_journal(p, repair=False)
        ids |= {r["id"] for r in entries.values()}
    return ids


def _resume_and_check(
    tmp_path: Path, server, inp: Path, out: Path, finished: set[str], log_at_kill: int
) -> None:
    paths = OutputPaths(out)
    rerun = subprocess.run(
        _cmd(inp, out, server.base_url, workers=3),
        env=regenerate_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rerun.returncode == 0, rerun.stderr
    ids = [r["id"] for r in read_jsonl(out)]
    assert ids == [f"r{i}" for i in range(N)], "every id exactly once, in input order"
    log = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    sent_after = {e["key"].split("#")[0] for e in log[log_at_kill:]}
    assert not sent_after & finished, f"finished records were sent again: {sorted(sent_after & finished)}"
    assert sent_after >= {f"r{i}" for i in range(N)} - finished
    summary = json.loads(paths.summary.read_text())
    assert summary["ok"] == N and summary["invariant_holds"]
    assert summary["resumed_from_journal"] == len(finished)
    assert not worker_journals(paths)
    _, entries = load_journal(paths.journal)
    assert sorted(entries) == list(range(N))


def test_sigkill_parent_then_resume_with_other_worker_count(tmp_path: Path, stub) -> None:
    server = stub(latency_ms=50, request_log=str(tmp_path / "requests.jsonl"))
    inp = write_records(tmp_path / "in.jsonl", prompts(N))
    out = tmp_path / "out" / "regen.jsonl"
    paths = OutputPaths(out)
    proc = subprocess.Popen(
        _cmd(inp, out, server.base_url, workers=2), env=regenerate_env(), stderr=subprocess.PIPE
    )
    _wait_for(paths, proc, 10)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _workers_gone(paths)  # the workers die with their parent (PR_SET_PDEATHSIG)
    assert worker_journals(paths), "the work was in the worker journals"
    log_at_kill = len((tmp_path / "requests.jsonl").read_text().splitlines())
    finished = _finished_ids(paths)
    assert 10 <= len(finished) < N, "the kill must land mid-run"
    assert not out.exists()
    _resume_and_check(tmp_path, server, inp, out, finished, log_at_kill)


def test_sigkill_worker_fails_the_run_then_resume(tmp_path: Path, stub) -> None:
    server = stub(latency_ms=50, request_log=str(tmp_path / "requests.jsonl"))
    inp = write_records(tmp_path / "in.jsonl", prompts(N))
    out = tmp_path / "out" / "regen.jsonl"
    paths = OutputPaths(out)
    proc = subprocess.Popen(
        _cmd(inp, out, server.base_url, workers=2), env=regenerate_env(), stderr=subprocess.PIPE, text=True
    )
    _wait_for(paths, proc, 10)
    journal0 = next(p for p in worker_journals(paths) if ".worker-0-of-2." in p.name)
    header = json.loads(journal0.read_text().splitlines()[0])
    os.kill(header["pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "worker 0 killed by signal 9" in err and "re-run" in err
    assert not out.exists()
    log_at_kill = len((tmp_path / "requests.jsonl").read_text().splitlines())
    finished = _finished_ids(paths)
    # Work is handed out on request, so worker 1 took over everything worker 0 had not been given:
    # only worker 0's outstanding records are missing: per lane (2) one in flight and one answered but
    # not yet fsync'd by the journal's group-commit thread (it lags on a loaded machine), and at most 3
    # queued (the 1 left when it asked for more + the next 2-record chunk): 7 at most. With a fixed
    # split, worker 0's whole unfinished half (~20 records) would be missing.
    assert N - 7 <= len(finished) < N
    _resume_and_check(tmp_path, server, inp, out, finished, log_at_kill)


def test_workers_that_cannot_start_end_the_run_with_a_clear_error(tmp_path: Path) -> None:
    """Nothing is handed out before every worker asked once; a worker that dies first must not hang it."""
    inp = write_records(tmp_path / "in.jsonl", prompts(6))
    with pytest.raises(RegenerationError, match=r"worker 0 exit 2.*re-run"):
        run_job(inp, tmp_path / "regen.jsonl", "http://127.0.0.1:9/v1", workers=2)


def test_fold_refuses_a_worker_journal_of_other_settings(tmp_path: Path) -> None:
    paths = OutputPaths(tmp_path / "regen.jsonl")
    stray = JournalWriter(tmp_path / "regen.worker-0-of-2.journal.jsonl", {"model": "a"})
    stray.append({"index": 0, "id": "r0"})
    stray.close()
    run = JournalWriter(paths.journal, {"model": "b"})
    try:
        with pytest.raises(
            RegenerationError, match=r"(?s)model: journal has \"a\", this run has \"b\".*--restart"
        ):
            fold(paths, {"model": "b"}, {0}, {}, run)
    finally:
        run.close()


def test_worker_arithmetic_and_cli_value(tmp_path: Path, stub) -> None:
    assert [concurrency_share(10, w, 3) for w in range(3)] == [4, 3, 3]
    assert sum(concurrency_share(256, w, 7) for w in range(7)) == 256
    assert auto_workers(256, 1, cpus=16) == 4 and auto_workers(256, 1, cpus=2) == 2
    assert auto_workers(8, 1, cpus=16) == 1 and auto_workers(64, 4, cpus=16) == 4
    # chunks: a quarter of an even share of what is left, capped by the worker's concurrency, >= 1
    assert chunk_size(10_000, 4, cap=64) == 64
    assert [chunk_size(left, 4, cap=64) for left in (800, 160, 17, 1)] == [50, 10, 2, 1]
    server = stub()
    inp = write_records(tmp_path / "in.jsonl", prompts(3))
    done = subprocess.run(
        _cmd(inp, tmp_path / "regen.jsonl", server.base_url, workers=0),
        env=regenerate_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "--workers '0': expected a positive integer or 'auto'" in done.stderr
    # more workers than records or concurrency: capped, still correct
    s = run_job(inp, tmp_path / "many.jsonl", server.base_url, workers=16, settings=settings(concurrency=2))
    assert s["ok"] == 3 and s["workers"] == 2
