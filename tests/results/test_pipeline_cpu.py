"""Issue 13, acceptance 2: the real-target pipeline end to end on CPU with a tiny budget.

The same stages as ``bench/real_target.sh`` (regenerate through the embedded server -> train with a
held-out slice -> select the checkpoint by measured accepted length -> evaluate the selected draft and
the n-gram floor -> results document), on a tiny random target and a dozen conversations.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from deepspec.cli import main
from deepspec.data.sequences import load_training_records, split_holdout

QUESTIONS = [
    "add two and three", "name a colour", "count to four", "say the cat sat", "spell cat",
    "what is one plus one", "name a fruit", "count to three", "say hello twice", "repeat ok ok",
    "add one and four", "name a number",
]  # fmt: skip


def _inputs(base: Path) -> tuple[Path, Path]:
    data = base / "conversations.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": q}]}) + "\n"
                            for i, q in enumerate(QUESTIONS)))  # fmt: skip
    bench = base / "bench"
    bench.mkdir()
    (bench / "math.jsonl").write_text(json.dumps({"turns": ["add two and two"]}) + "\n")
    (bench / "chat.jsonl").write_text(json.dumps({"turns": ["say the cat sat on the mat"]}) + "\n")
    return data, bench


def _recipe(tiny_dir: str, data: Path, bench: Path, root: Path) -> dict:
    return {
        "name": "real-target-cpu",
        "target": {"model": tiny_dir, "served_model_name": "tiny"},
        "data": {"path": str(data), "max_length": 96, "holdout": 3},
        "regeneration": {"concurrency": 4, "sampling": {"temperature": 0.0, "max_tokens": 16, "seed": 0},
                         "output": "regenerated.jsonl"},
        "draft": {"algorithm": "eagle3", "ttt_steps": 2},
        "training": {"output_dir": "eagle3", "global_batch_size": 3, "micro_batch_size": 3, "max_steps": 3,
                     "save_every": 1, "keep_last": 3, "log_every": 1, "precision": "fp32", "lr": 3e-3},
        "evaluation": {"benchmarks_dir": str(bench), "benchmarks": ["math", "chat"], "max_new_tokens": 12,
                       "temperature": 0.0, "num_proposals": 3, "output_dir": "eval"},
        "storage": {"root": str(root)},
    }  # fmt: skip


def test_regenerate_train_select_eval_compare(tiny_dir, tmp_path, monkeypatch):
    data, bench = _inputs(tmp_path)
    root = tmp_path / "run"
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(_recipe(tiny_dir, data, bench, root)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEEPSPEC_CACHE", str(tmp_path / "cache"))
    c = ["-c", str(cfg)]

    # 1. regenerate (embedded server) + train; the held-out records are never trained on
    assert main(["run", *c, "--stages", "regenerate,train"]) == 0
    records = load_training_records(root / "regenerated.jsonl")
    train, held = split_holdout(records, 3)
    assert len(held) == 3 and len(train) == len(QUESTIONS) - 3
    ckpts = root / "eagle3"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_1", "step_2", "step_3"]

    # 2. select by measured accepted length on the held-out prompts
    assert main(["eval", *c, "--select", "--batch-size", "2", "--no-progress", "--device", "cpu"]) == 0
    selection = json.loads((ckpts / "selection.json").read_text())
    assert selection["prompts"] == 3 and [x["step"] for x in selection["candidates"]] == [1, 2, 3]
    best = max(selection["candidates"], key=lambda x: (x["accept_length"], x["step"]))
    assert (ckpts / "selected").read_text().strip() == f"step_{best['step']}" == selection["selected"]
    assert all(x["rounds"] > 0 and x["accept_length"] >= 1.0 for x in selection["candidates"])

    # 3. evaluate the selected draft and the n-gram floor on the same prompts
    ev = ["--no-progress", "--device", "cpu"]
    assert (
        main(
            [
                "eval",
                *c,
                "--checkpoint",
                "eagle3/selected",
                "--output",
                "eval-eagle3",
                "--batch-size",
                "1,2",
                *ev,
            ]
        )
        == 0
    )
    assert main(["eval", *c, "--drafter", "ngram", "--output", "eval-ngram", *ev]) == 0
    draft = json.loads((root / "eval-eagle3" / "report.json").read_text())
    floor = json.loads((root / "eval-ngram" / "report.json").read_text())
    assert draft["checkpoint"].endswith(selection["selected"])

    # 4. the results document, read only from those reports and the training logs
    (tmp_path / "commands.sh").write_text("deepspec run -c recipe.yaml --stages regenerate,train\n")
    out = tmp_path / "docs"
    assert main(["eval", "--compare", str(root / "eval-eagle3"), str(root / "eval-ngram" / "report.json"),
                 "--output", str(out), "--commands", str(tmp_path / "commands.sh"), "--machine", "ci"]) == 0  # fmt: skip
    doc = (out / "results.md").read_text()
    macro_row = next(line for line in doc.splitlines() if line.startswith("| **macro**"))
    assert f"**{draft['macro']['tau']:.2f}**" in macro_row and f"**{floor['macro']['tau']:.2f}**" in macro_row
    assert (
        f"| math | 1 | {draft['benchmarks']['math']['tau']:.2f} | {floor['benchmarks']['math']['tau']:.2f} |"
        in doc
    )
    assert "beats the n-gram floor" in doc and "deepspec run -c recipe.yaml" in doc
    assert f"{selection['selected']} (tau" in doc  # the training table names the selected step
    assert "### Speedup against batch size, T = 0" in doc and "| eagle3 |" in doc.split("### Speedup")[1]
    assert (out / "results_acceptance_t0.png").stat().st_size > 0
    assert (out / "results_speedup_t0.png").stat().st_size > 0
    assert (out / "results_training.png").stat().st_size > 0
