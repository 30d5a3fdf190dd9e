"""Benchmark loading (caps, shuffle, turns) and the offline conversion logic of `benchmarks fetch`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from deepspec.config import EvaluationConfig
from deepspec.eval import benchmarks_cli as bc
from deepspec.eval.benchmarks import BenchmarkError, load_benchmarks, resolve_benchmarks_dir

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "eval"


def _write(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_caps_shuffle_and_indices(tmp_path):
    _write(tmp_path / "a.jsonl", [{"turns": [f"q{i}", f"f{i}"]} for i in range(10)])
    _write(tmp_path / "b.jsonl", [{"turns": ["only"]}, {"nope": 1}])
    cfg = EvaluationConfig(benchmarks=["a", "b"], caps={"a": 4}, shuffle_seed=1)
    got = load_benchmarks(cfg, tmp_path)
    assert [p.index for p in got["a"]] == [0, 1, 2, 3]
    assert len(got["b"]) == 1 and got["b"][0].turns == ["only"]
    again = load_benchmarks(cfg, tmp_path)
    assert [p.turns for p in again["a"]] == [p.turns for p in got["a"]]  # deterministic
    other = load_benchmarks(EvaluationConfig(benchmarks=["a"], caps={"a": 4}, shuffle_seed=2), tmp_path)
    assert [p.turns for p in other["a"]] != [p.turns for p in got["a"]]
    capped = load_benchmarks(EvaluationConfig(benchmarks=["a"], caps={"a": 4}, max_prompts=2), tmp_path)
    assert len(capped["a"]) == 2


def test_missing_benchmark_names_the_file(tmp_path):
    _write(tmp_path / "a.jsonl", [{"turns": ["x"]}])
    with pytest.raises(BenchmarkError, match=r"'zzz'.*available.*a"):
        load_benchmarks(EvaluationConfig(benchmarks=["zzz"]), tmp_path)
    with pytest.raises(BenchmarkError, match="not found"):
        resolve_benchmarks_dir(tmp_path / "missing")


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared datasets not present")
def test_shared_suite_with_default_caps():
    cfg = EvaluationConfig()  # benchmarks_dir ../shared/datasets/eval resolves beside the repository
    got = load_benchmarks(cfg)
    assert set(got) == set(cfg.benchmarks)
    assert len(got["gsm8k"]) == 500 and len(got["aime25"]) == 30 and len(got["mbpp"]) == 256
    assert len(got["mt-bench"]) == 80 and len(got["mt-bench"][0].turns) == 2


# -------------------------------------------------------------------------- fetch conversions (offline)


def test_conversions_match_the_shipped_format():
    assert bc.conv_math({"question": "1+1?", "answer": "2"}) == ["1+1?" + bc.REASONING_SUFFIX]
    assert bc.conv_math({"problem": "x"})[0].endswith("within \\boxed{}.")
    he = bc.conv_humaneval({"prompt": "def f():\n", "task_id": "HumanEval/0"})[0]
    assert he.startswith("Write a solution to the following problem") and he.endswith("def f():\n\n```")
    assert bc.conv_mbpp({"prompt": "Write a function.", "test_list": []}) == ["Write a function."]
    lcb = bc.conv_livecodebench({"question_content": "Q", "starter_code": ""})[0]
    assert "### Question:\nQ" in lcb and lcb.endswith("(use the provided format with backticks)")
    assert "starter code" in bc.conv_livecodebench({"question_content": "Q", "starter_code": "class S:"})[0]
    assert bc.conv_mt_bench({"prompt": ["a", "b"]}) == ["a", "b"]
    uo = bc.conv_instruction({"instruction": "Rewrite.", "instances": [{"input": "text", "output": ""}]})
    assert uo == ["Rewrite.\n\nInput:\ntext"]
    assert bc.conv_instruction({"instruction": "Say hi.", "input": ""}) == ["Say hi."]
    assert bc.conv_arena_hard({"uid": "1", "prompt": "P"}) == ["P"]


def test_shipped_files_are_reproduced_by_the_converters():
    """The first shipped gsm8k / humaneval prompts equal what the converters build from the raw fields."""
    if not SHARED.is_dir():
        pytest.skip("shared datasets not present")
    first = json.loads((SHARED / "gsm8k.jsonl").open().readline())["turns"][0]
    question = first.removesuffix(bc.REASONING_SUFFIX)
    assert bc.conv_math({"question": question}) == [first]
    he = json.loads((SHARED / "humaneval.jsonl").open().readline())["turns"][0]
    body = he.split("```python\n", 1)[1].removesuffix("\n```")
    assert bc.conv_humaneval({"prompt": body}) == [he]


def test_raw_readers_and_bad_records(tmp_path):
    jsonl = b'{"question": "a"}\n\n{"question": "b"}\n'
    rows, errors = bc.convert_records("gsm8k", bc.iter_records("x.jsonl", jsonl))
    assert [r["turns"][0][:1] for r in rows] == ["a", "b"] and not errors
    rows, errors = bc.convert_records(
        "alpaca", bc.iter_records("x.json", b'[{"instruction": "i"}, {"foo": 1}]')
    )
    assert rows == [{"turns": ["i"]}] and "alpaca record 1" in errors[0]
    import gzip

    rows, _ = bc.convert_records(
        "humaneval", bc.iter_records("h.jsonl.gz", gzip.compress(b'{"prompt": "def h():"}'))
    )
    assert rows[0]["turns"][0].endswith("def h():\n```")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["def g():\n"]}), buf)
    rows, _ = bc.convert_records("humaneval", bc.iter_records("t.parquet", buf.getvalue()))
    assert rows[0]["turns"][0].startswith("Write a solution")


def test_fetch_end_to_end_with_a_fake_downloader(tmp_path, monkeypatch):
    payloads = {
        "math500": b'{"problem": "p1"}\n{"problem": "p2"}\n',
        "mt-bench": b'{"prompt": ["t1", "t2"]}\n',
    }

    def fake_download(url, timeout):
        return payloads["math500" if "MATH-500" in url else "mt-bench"]

    monkeypatch.setattr(bc, "_download", fake_download)
    counts = bc.fetch(["math500", "mt-bench"], tmp_path)
    assert counts == {"math500": 2, "mt-bench": 1}
    got = load_benchmarks(EvaluationConfig(benchmarks=["math500", "mt-bench"]), tmp_path)
    assert got["mt-bench"][0].turns == ["t1", "t2"]


def test_checkpoint_resolution(tmp_path):
    from deepspec.eval.checkpoints import resolve_checkpoint

    step = tmp_path / "out" / "step_5"
    step.mkdir(parents=True)
    (step / "config.json").write_text("{}")
    (tmp_path / "out" / "latest").write_text("step_5\n")
    assert resolve_checkpoint(step) == step
    assert resolve_checkpoint(tmp_path / "out") == step
    assert resolve_checkpoint(tmp_path / "out" / "latest") == step  # what `deepspec run` passes
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)
