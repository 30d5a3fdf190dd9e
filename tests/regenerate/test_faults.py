"""Acceptance 3: 500 / 429 / dropped connections are retried; permanent failures end `error`."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from deepspec.regenerate.endpoints import EndpointPool
from deepspec.regenerate.job import RegenerationError

from .conftest import prompts, read_jsonl, run_job, settings, write_records


def test_transient_faults_retry_and_permanent_ones_error(tmp_path: Path, stub) -> None:
    server = stub(
        fail_rate=0.4,
        fail_times=2,
        fault_kinds=("500", "429", "drop"),
        permanent_ids=("r3:400", "r7:500"),
        request_log=str(tmp_path / "log.jsonl"),
    )
    inp = write_records(tmp_path / "in.jsonl", prompts(40))
    out = tmp_path / "regen.jsonl"
    summary = run_job(inp, out, server.base_url, settings=settings(max_retries=3))

    outcomes = server.state.outcomes
    assert outcomes["500"] and outcomes["429"] and outcomes["drop"], outcomes  # every fault kind happened
    records = {r["id"]: r for r in read_jsonl(out)}
    retried = {k.split("#")[0] for k, n in server.state.attempts.items() if n > 1} - {"r3", "r7"}
    assert len(retried) >= 5
    for rid in retried:  # transient failures end ok after retries
        assert records[rid]["status"] == "ok", records[rid]
        assert records[rid]["retries"] >= 1
    assert records["r3"]["status"] == "error"
    assert "permanent error: HTTP 400" in records["r3"]["error"]
    assert server.state.attempts["r3#1"] == 1, "a 400 is not retried"
    assert records["r7"]["status"] == "error"
    assert "gave up after 4 attempts" in records["r7"]["error"] and "HTTP 500" in records["r7"]["error"]
    assert server.state.attempts["r7#1"] == 4
    assert summary["ok"] == 38 and summary["error"] == 2
    assert (
        summary["ok"] + summary["truncated"] + summary["error"] + summary["skipped"] == summary["input"] == 40
    )
    assert summary["retries"] == sum(n - 1 for n in server.state.attempts.values()) - 0
    errors = read_jsonl(tmp_path / "regen.errors.jsonl")
    assert {e["id"] for e in errors} == {"r3", "r7"}


def test_without_retries_transient_faults_are_errors(tmp_path: Path, stub) -> None:
    """The control: the same faults with max_retries=0 do end in `error`, so retries are what fixed them."""
    server = stub(fail_rate=0.4, fault_kinds=("500", "429", "drop"))
    inp = write_records(tmp_path / "in.jsonl", prompts(20))
    summary = run_job(inp, tmp_path / "regen.jsonl", server.base_url, settings=settings(max_retries=0))
    assert summary["error"] > 0


def test_unhealthy_endpoint_is_skipped(tmp_path: Path, stub, caplog) -> None:
    server = stub()
    dead = "http://127.0.0.1:9/v1"  # discard port: nothing listens
    inp = write_records(tmp_path / "in.jsonl", prompts(5))
    with caplog.at_level(logging.WARNING, logger="deepspec.regenerate"):
        summary = run_job(inp, tmp_path / "regen.jsonl", [dead, server.base_url])
    assert summary["ok"] == 5
    assert any("unhealthy" in r.message and "127.0.0.1:9" in r.message for r in caplog.records)
    assert summary["endpoints"][dead]["requests"] == 0


def test_no_healthy_endpoint_is_a_clear_error(tmp_path: Path) -> None:
    inp = write_records(tmp_path / "in.jsonl", prompts(2))
    with pytest.raises(RegenerationError, match="no healthy endpoint"):
        run_job(inp, tmp_path / "regen.jsonl", "http://127.0.0.1:9")


def test_backoff_is_full_jitter_and_bounded() -> None:
    import random

    pool = EndpointPool(
        ["http://x:1/v1"], concurrency=1, backoff_initial_s=0.5, backoff_max_s=4.0, rng=random.Random(0)
    )
    for retry in range(8):
        delays = [pool.backoff(retry) for _ in range(200)]
        cap = min(4.0, 0.5 * 2**retry)
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > 0.8 * cap  # spread over the whole range (full jitter)
    assert pool.backoff(0, retry_after=3.0) >= 3.0


def test_network_error_reasons_name_what_happened(tmp_path: Path, stub) -> None:
    """A dropped connection, a per-request timeout and a refused connection each say so.

    The aiohttp transport maps every connection error to httpx's ``ConnectTimeout``; the reason must
    come from the transport's own exception, not from that mapping.
    """
    dropping = stub(fail_rate=1.0, fail_times=9, fault_kinds=("drop",))
    inp = write_records(tmp_path / "in.jsonl", prompts(1))
    run_job(inp, tmp_path / "drop.jsonl", dropping.base_url, settings=settings(max_retries=0))
    [dropped] = read_jsonl(tmp_path / "drop.jsonl")
    assert dropped["status"] == "error"
    assert "connection error (ServerDisconnectedError" in dropped["error"], dropped["error"]

    slow = stub(latency_ms=2000)
    run_job(
        inp, tmp_path / "slow.jsonl", slow.base_url, settings=settings(max_retries=0, request_timeout_s=0.3)
    )
    [timed_out] = read_jsonl(tmp_path / "slow.jsonl")
    assert timed_out["status"] == "error"
    assert "last: timeout (" in timed_out["error"], timed_out["error"]

    with pytest.raises(RegenerationError, match=r"connection error \(ConnectionRefusedError"):
        run_job(inp, tmp_path / "refused.jsonl", "http://127.0.0.1:9")
