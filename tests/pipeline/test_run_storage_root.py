"""`deepspec run` honours storage.root: every artefact under the root, nothing elsewhere (issue 9, acceptance 1).

The whole pipeline (embedded server -> regenerate -> train -> eval -> export) runs on a tiny random target,
once with a local root and once with an ``s3://`` root served by moto. The working directory is an empty
folder, and must still be empty afterwards; eval and export read what train wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
import yaml

from deepspec.cli import main


def _write_inputs(base: Path) -> tuple[Path, Path]:
    """Three conversations and a one-prompt benchmark folder, outside the run's root."""
    data = base / "inputs" / "conversations.jsonl"
    data.parent.mkdir(parents=True)
    with data.open("w") as f:
        for i, q in enumerate(["add two and three", "name a colour", "count to four"]):
            f.write(json.dumps({"messages": [{"role": "user", "content": q}], "id": f"c{i}"}) + "\n")
    bench = base / "inputs" / "bench"
    bench.mkdir()
    (bench / "tiny.jsonl").write_text(json.dumps({"turns": ["say hello"]}) + "\n")
    return data, bench


def _recipe(tiny_dir: str, data: Path, bench: Path, root: str, endpoint: str | None) -> dict:
    return {
        "name": "storage-root",
        "target": {"model": tiny_dir, "served_model_name": "tiny"},
        "data": {"path": str(data), "max_length": 96},
        "regeneration": {"concurrency": 2, "sampling": {"temperature": 0.0, "max_tokens": 12, "seed": 0},
                         "output": "regen/answers.jsonl"},
        "draft": {"algorithm": "eagle3", "ttt_steps": 2},
        "training": {"output_dir": "ckpt", "global_batch_size": 2, "micro_batch_size": 2, "max_steps": 2,
                     "save_every": 2, "log_every": 1, "precision": "fp32"},
        "evaluation": {"benchmarks_dir": str(bench), "benchmarks": ["tiny"], "max_new_tokens": 8,
                       "temperature": 0.0, "output_dir": "eval"},
        "export": {"format": "vllm", "output_dir": "export", "force": True},
        "storage": {"root": root, "s3_endpoint_url": endpoint},
    }  # fmt: skip


def _files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def _run(recipe: dict, base: Path, monkeypatch) -> None:
    cfg = base / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    cwd = base / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("DEEPSPEC_CACHE", str(base / "cache"))
    assert main(["run", "-c", str(cfg), "--set", "training.precision=fp32"]) == 0
    assert _files_under(cwd) == set(), "nothing may be written outside storage.root"


def _check_artefacts(names: set[str]) -> None:
    assert "regen/answers.jsonl" in names and "regen/answers.summary.json" in names
    assert "ckpt/latest" in names and any(n.startswith("ckpt/step_2/") for n in names)
    assert any(n.startswith("eval/") and n.endswith(".json") for n in names)
    assert "export/config.json" in names and "export/model.safetensors" in names


def test_local_root(tiny_dir, tmp_path, monkeypatch):
    data, bench = _write_inputs(tmp_path)
    root = tmp_path / "root"
    _run(_recipe(tiny_dir, data, bench, str(root), None), tmp_path, monkeypatch)
    _check_artefacts(_files_under(root))


def test_s3_root(tiny_dir, tmp_path, monkeypatch, moto_s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=moto_s3_endpoint)
    s3.create_bucket(Bucket="runs")
    data, bench = _write_inputs(tmp_path)
    _run(_recipe(tiny_dir, data, bench, "s3://runs/team/r1", moto_s3_endpoint), tmp_path, monkeypatch)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="runs").get("Contents", [])}
    assert all(k.startswith("team/r1/") for k in keys)
    _check_artefacts({k[len("team/r1/") :] for k in keys})
    assert not any(Path(p).name == "s3:" for p in os.listdir(tmp_path))
