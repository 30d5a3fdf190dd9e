"""Regenerate reads and writes through the run layout: ``storage.root`` local or ``s3://`` (moto's
server), an ``s3://`` input, nothing written in the working directory, resume and shard merge on S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import boto3
import pytest

from deepspec.cli import main

from .conftest import prompts, read_jsonl, write_records

N = 12
DEFAULT_OUTPUT = "runs/demo/regenerated.jsonl"  # regeneration.output's default (relative)


def regenerate(url: str, *args: str) -> int:
    return main(["regenerate", "--quiet", "--endpoint", url, "--set", "regeneration.concurrency=4", *args])


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory (it must stay empty) and a private deepspec cache."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("DEEPSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    return cwd


def test_local_storage_root(tmp_path: Path, workdir: Path, stub) -> None:
    server = stub()
    inp = write_records(tmp_path / "in.jsonl", prompts(N))
    root = tmp_path / "root"
    assert regenerate(server.base_url, "--set", f"storage.root={root}", "--set", f"data.path={inp}") == 0

    out = root / DEFAULT_OUTPUT
    assert [r["id"] for r in read_jsonl(out)] == [f"r{i}" for i in range(N)]
    summary = json.loads(out.with_name("regenerated.summary.json").read_text())
    assert summary["output"] == str(out) and summary["ok"] == N
    assert out.with_name("regenerated.journal.jsonl").is_file()
    assert list(workdir.iterdir()) == []


@pytest.fixture
def s3(moto_s3_endpoint: str, request: pytest.FixtureRequest) -> tuple[Any, str]:
    """(boto3 client, bucket) on moto's server; one bucket per test."""
    client = boto3.client("s3", endpoint_url=moto_s3_endpoint)
    bucket = "regen-" + request.node.name.replace("_", "-").lower()[:40]
    client.create_bucket(Bucket=bucket)
    return client, bucket


def keys(client: Any, bucket: str) -> set[str]:
    return {o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}


def s3_args(endpoint: str, bucket: str) -> list[str]:
    return ["--set", f"storage.root=s3://{bucket}/run", "--set", f"storage.s3_endpoint_url={endpoint}",
            "--set", f"data.path=s3://{bucket}/in/conversations.jsonl"]  # fmt: skip


def test_s3_input_and_root(tmp_path: Path, workdir: Path, stub, s3, moto_s3_endpoint: str) -> None:
    client, bucket = s3
    server = stub()
    records = prompts(N)
    records.insert(3, "not json")  # a bad line: skipped, listed in the errors file
    client.upload_file(str(write_records(tmp_path / "in.jsonl", records)), bucket, "in/conversations.jsonl")

    assert regenerate(server.base_url, *s3_args(moto_s3_endpoint, bucket)) == 0
    prefix = "run/" + DEFAULT_OUTPUT.removesuffix(".jsonl")
    published = {f"{prefix}.jsonl", f"{prefix}.errors.jsonl", f"{prefix}.summary.json"}
    assert keys(client, bucket) == {"in/conversations.jsonl", *published}  # no journal on S3
    body = client.get_object(Bucket=bucket, Key=f"{prefix}.jsonl")["Body"].read().decode()
    out = [json.loads(line) for line in body.splitlines()]
    assert [r["status"] for r in out].count("skipped") == 1 and len(out) == N + 1
    summary = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}.summary.json")["Body"].read())
    assert summary["output"] == f"s3://{bucket}/{prefix}.jsonl"
    assert summary["input_path"] == f"s3://{bucket}/in/conversations.jsonl"
    assert summary["ok"] == N and summary["skipped"] == 1 and summary["invariant_holds"]
    assert list(workdir.iterdir()) == [], "nothing is written in the working directory"
    journals = list((tmp_path / "cache" / "work").rglob("regenerated.journal.jsonl"))
    assert len(journals) == 1, "the journal lives in the local work folder of the output URI"

    # A re-run resumes from the local journal: nothing is sent again, the output is published again.
    sent = sum(server.state.attempts.values())
    client.delete_object(Bucket=bucket, Key=f"{prefix}.jsonl")
    assert regenerate(server.base_url, *s3_args(moto_s3_endpoint, bucket)) == 0
    assert sum(server.state.attempts.values()) == sent
    assert keys(client, bucket) == {"in/conversations.jsonl", *published}


def test_s3_shards_and_merge(
    tmp_path: Path, workdir: Path, stub, s3, moto_s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client, bucket = s3
    server = stub()
    client.upload_file(
        str(write_records(tmp_path / "in.jsonl", prompts(N))), bucket, "in/conversations.jsonl"
    )
    args = s3_args(moto_s3_endpoint, bucket)
    assert regenerate(server.base_url, *args, "--shard", "0/2") == 0

    # Shard 1 has not run: the merge names the missing object.
    assert main(["regenerate", *args, "--merge", "--shards", "2"]) == 2
    shard1 = f"s3://{bucket}/run/runs/demo/regenerated.shard-1-of-2.jsonl"
    assert f"shard 1/2 is missing or unfinished ({shard1} has no summary)" in capsys.readouterr().err

    assert regenerate(server.base_url, *args, "--shard", "1/2") == 0
    shutil.rmtree(tmp_path / "cache")  # the merge runs elsewhere (another pod): it reads the shards from S3
    assert main(["regenerate", *args, "--merge", "--shards", "2"]) == 0
    prefix = "run/" + DEFAULT_OUTPUT.removesuffix(".jsonl")
    body = client.get_object(Bucket=bucket, Key=f"{prefix}.jsonl")["Body"].read().decode()
    assert [json.loads(line)["id"] for line in body.splitlines()] == [f"r{i}" for i in range(N)]
    summary = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}.summary.json")["Body"].read())
    assert summary["shards"] == 2 and summary["ok"] == N
    assert summary["output"] == f"s3://{bucket}/{prefix}.jsonl"
    assert list(workdir.iterdir()) == []


def test_missing_s3_input_is_a_clear_error(
    workdir: Path, stub, s3, moto_s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, bucket = s3
    assert regenerate(stub().base_url, *s3_args(moto_s3_endpoint, bucket)) == 2
    err = capsys.readouterr().err
    assert f"s3://{bucket}/in/conversations.jsonl" in err and "does not exist" in err


def test_an_interrupted_output_write_keeps_the_old_output(tmp_path: Path) -> None:
    from deepspec.storage import atomic_write_jsonl

    out = tmp_path / "regen.jsonl"
    atomic_write_jsonl(out, [{"index": 0}])

    def failing() -> Any:
        yield {"index": 0}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_jsonl(out, failing())
    assert read_jsonl(out) == [{"index": 0}]
    assert [p.name for p in tmp_path.iterdir()] == ["regen.jsonl"], "no temporary file is left"
