"""Shared helpers: an in-process stub server, input writers and a library-level run helper."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deepspec.config import RegenerationConfig
from deepspec.regenerate.job import RegenerationJob
from deepspec.regenerate.runner import regenerate
from deepspec.testing.stub_server import StubConfig, StubServer


@pytest.fixture
def stub() -> Iterator[Any]:
    """Factory: ``with stub(latency_ms=..) as server: server.base_url, server.state``."""
    servers: list[StubServer] = []

    def make(**kwargs: Any) -> StubServer:
        server = StubServer(StubConfig(**kwargs))
        server.__enter__()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.__exit__(None, None, None)


def write_records(path: Path, records: list[Any]) -> Path:
    """Write records (dicts are JSON-encoded, bytes/str written verbatim) one per line."""
    with open(path, "wb") as f:
        for r in records:
            if isinstance(r, bytes):
                f.write(r.rstrip(b"\n") + b"\n")
            elif isinstance(r, str):
                f.write(r.encode() + b"\n")
            else:
                f.write(json.dumps(r).encode() + b"\n")
    return path


def prompts(n: int, prefix: str = "r") -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}{i}", "conversations": [{"role": "user", "content": f"question number {i}"}]}
        for i in range(n)
    ]


def settings(**overrides: Any) -> RegenerationConfig:
    base: dict[str, Any] = {
        "concurrency": 8,
        "max_retries": 4,
        "backoff_initial_s": 0.005,
        "backoff_max_s": 0.02,
        "request_timeout_s": 10,
        "sampling": {"max_tokens": 64, "seed": 0},
    }
    for k, v in overrides.items():
        if k == "sampling":
            base["sampling"] = {**base["sampling"], **v}
        else:
            base[k] = v
    return RegenerationConfig.model_validate(base)


def run_job(inp: Path, out: Path, url: str | list[str], **kwargs: Any) -> dict[str, Any]:
    s = kwargs.pop("settings", None) or settings()
    job = RegenerationJob(
        input_path=str(inp),
        output_path=str(out),
        endpoints=[url] if isinstance(url, str) else url,
        settings=s,
        progress=False,
        **kwargs,
    )
    return regenerate(job)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def regenerate_cmd(inp: Path, out: Path, url: str, concurrency: int, *extra: str) -> list[str]:
    """The ``deepspec regenerate`` command line the subprocess tests (kill, resume) run."""
    return [sys.executable, "-m", "deepspec.cli", "regenerate", "--input", str(inp), "--output", str(out),
            "--endpoint", url, "--quiet", *extra, "--set", f"regeneration.concurrency={concurrency}",
            "--set", "regeneration.sampling.seed=1"]  # fmt: skip


def regenerate_env() -> dict[str, str]:
    """The environment for those subprocesses: offline, and not inside a Kubernetes Indexed Job."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("JOB_COMPLETION_INDEX", None)
    return env
