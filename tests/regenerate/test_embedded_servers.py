"""`deepspec regenerate --servers N`: N embedded `deepspec serve` processes share the work, and none
outlives the run, whether it succeeds or a server fails to start."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import yaml

from deepspec.cli import main

from .conftest import prompts, read_jsonl, write_records


def _recipe(tmp_path: Path, model: str) -> Path:
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump({
        "target": {"model": model, "served_model_name": "tiny"},
        "regeneration": {"concurrency": 4, "sampling": {"max_tokens": 8, "seed": 0, "temperature": 0.0}},
        "storage": {"root": str(tmp_path / "root")},
    }))  # fmt: skip
    return cfg


def _port_open(url: str) -> bool:
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


def test_two_servers_share_the_requests_and_stop_after_the_run(tmp_path, tiny_dir) -> None:
    inp = write_records(tmp_path / "in.jsonl", prompts(8))
    out = tmp_path / "out" / "regen.jsonl"
    argv = ["regenerate", "-c", str(_recipe(tmp_path, tiny_dir)), "--input", str(inp), "--output", str(out),
            "--quiet", "--servers", "2"]  # fmt: skip
    assert main(argv) == 0
    assert [r["id"] for r in read_jsonl(out)] == [f"r{i}" for i in range(8)]
    summary = json.loads((tmp_path / "out" / "regen.summary.json").read_text())
    served = summary["endpoints"]
    assert len(served) == 2 and all(e["requests"] > 0 for e in served.values()), served
    assert sorted(p.name for p in out.parent.glob("regen.jsonl.server-*.log")) == [
        "regen.jsonl.server-0.log",
        "regen.jsonl.server-1.log",
    ]
    assert not any(_port_open(url) for url in served), "a server outlived the run"


def test_a_server_that_cannot_start_is_named_and_none_is_left(tmp_path, capsys) -> None:
    inp = write_records(tmp_path / "in.jsonl", prompts(2))
    out = tmp_path / "out" / "regen.jsonl"
    argv = ["regenerate", "-c", str(_recipe(tmp_path, str(tmp_path / "no-such-model"))), "--input", str(inp),
            "--output", str(out), "--quiet", "--servers", "2"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "embedded server" in err and "regen.jsonl.server-" in err and "exited with code" in err
    assert not out.exists()


def test_servers_and_endpoints_do_not_combine(tmp_path, capsys) -> None:
    inp = write_records(tmp_path / "in.jsonl", prompts(2))
    argv = ["regenerate", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--servers", "2",
            "--endpoint", "http://127.0.0.1:9/v1"]  # fmt: skip
    assert main(argv) == 2
    assert "--servers 2" in capsys.readouterr().err
