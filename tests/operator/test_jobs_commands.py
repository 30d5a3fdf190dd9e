"""The commands the operator's small Jobs run (``deepspec operator seed | prune | read-summary``),
on a local folder standing for the run volume and on an S3 bucket served by moto."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from deepspec.operator.seed import SeedError, prune, read_summary, seed

SUMMARY = {"v": 1, "algorithm": "eagle3", "macro_accept_length": 3.1, "benchmarks": {"gsm8k": {"tau": 3.2}}}
KEEP = ["regenerate-0000aaaa", "train-1111bbbb", "evaluate-2222cccc", "export-3333dddd"]


@pytest.fixture
def http_file(tmp_path: Path) -> Iterator[str]:
    """A local HTTP server serving one dataset file."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www/prompts.jsonl").write_text('{"turns": ["hi"]}\n')

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):  # type: ignore[no-untyped-def]
            super().__init__(*a, directory=str(tmp_path / "www"), **kw)

        def log_message(self, *a) -> None:  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/prompts.jsonl"
    server.shutdown()


def test_seed_copies_a_missing_dataset_over_http_once(tmp_path: Path, http_file: str) -> None:
    dest = tmp_path / "volume/datasets/train/prompts.jsonl"
    assert seed(str(dest), http_file) == [f"dataset {dest}: copied from {http_file}"]
    assert dest.read_text() == '{"turns": ["hi"]}\n'
    assert seed(str(dest), http_file) == [f"dataset {dest}: present"]  # never overwritten
    assert not [p for p in dest.parent.iterdir() if p.name != dest.name]  # no temp file left


def test_seed_names_what_is_missing(tmp_path: Path) -> None:
    dest = tmp_path / "volume/prompts.jsonl"
    dest.parent.mkdir()
    dest.write_text("{}\n")
    with pytest.raises(SeedError, match=r"gsm8k\.jsonl.*benchmarksSource: fetch"):
        seed(str(dest), benchmarks_dir=str(tmp_path / "volume/benchmarks"), benchmarks=["gsm8k"])


def test_prune_keeps_the_serving_run_and_foreign_folders(tmp_path: Path) -> None:
    root = tmp_path / "data/qwen3"
    for name in [*KEEP, "train-9999eeee", "evaluate-8888ffff", "my-notes"]:
        (root / name).mkdir(parents=True)
        (root / name / "f.txt").write_text("x")
    assert prune(str(root), KEEP) == ["evaluate-8888ffff", "train-9999eeee"]
    assert sorted(p.name for p in root.iterdir()) == sorted([*KEEP, "my-notes"])
    with pytest.raises(ValueError, match="refusing"):
        prune(str(root), ["../etc"])


def test_prune_and_read_summary_on_s3(moto_s3_endpoint: str, tmp_path: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_s3_endpoint)
    s3.create_bucket(Bucket="prune-test")
    for key in ["p/ml/q/train-1111bbbb/draft/a", "p/ml/q/train-9999eeee/draft/a", "p/ml/q/train-9999eeee/b",
                "p/ml/q/evaluate-2222cccc/summary.json"]:  # fmt: skip
        body = json.dumps(SUMMARY) if key.endswith("summary.json") else "x"
        s3.put_object(Bucket="prune-test", Key=key, Body=body.encode())
    assert prune("s3://prune-test/p/ml/q", KEEP, moto_s3_endpoint) == ["train-9999eeee"]
    left = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="prune-test")["Contents"])
    assert left == ["p/ml/q/evaluate-2222cccc/summary.json", "p/ml/q/train-1111bbbb/draft/a"]
    log = tmp_path / "termination-log"
    text = read_summary("s3://prune-test/p/ml/q/evaluate-2222cccc/summary.json", str(log), moto_s3_endpoint)
    assert json.loads(log.read_text()) == json.loads(text) and json.loads(text)["macro_accept_length"] == 3.1
