"""Reports (JSON, Markdown, plots, compact summary), rank sharding/merging and the `deepspec eval` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepspec.eval.benchmarks import BenchmarkPrompt
from deepspec.eval.drafters import RandomDrafter
from deepspec.eval.engine import EngineConfig, SpeculativeEngine
from deepspec.eval.metrics import AcceptanceStats
from deepspec.eval.report import build_report, compact_summary, summary_json, write_report
from deepspec.eval.runner import RunSettings, evaluate_benchmarks, merge_rank_files, write_rank_file
from deepspec.eval.summary import SUMMARY_LIMIT

from .conftest import TargetCopyDrafter


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny character tokenizer (with a chat template: prompts follow the one rendering rule)."""
    from deepspec.testing.tiny import tiny_tokenizer

    return tiny_tokenizer()


def _stats(rounds):
    s = AcceptanceStats(prompts=1)
    for g, a in rounds:
        s.add_round(g, a)
    s.decode_seconds, s.new_tokens = 1.0, s.committed
    return s


def test_report_summary_shape_and_limit(tmp_path):
    base = AcceptanceStats(prompts=1, rounds=10, committed=10, decode_seconds=2.0, new_tokens=10)
    results = {"gsm8k": (_stats([(7, 3), (7, 1)]), base), "mt-bench": (_stats([(7, 7)]), None)}
    report = build_report(
        results,
        algorithm="eagle3",
        target="t",
        target_revision="abc",
        checkpoint="/path/step_100",
        protocol={"temperature": 1.0, "num_proposals": 7},
    )
    s = compact_summary(report)
    assert set(s) == {"v", "algorithm", "target_revision", "checkpoint", "macro_accept_length", "benchmarks"}
    assert s["v"] == 1 and s["target_revision"] == "abc" and s["checkpoint"] == "/path/step_100"
    assert s["benchmarks"]["gsm8k"] == {"tau": 3.0, "acceptance_ratio": round(4 / 14, 4), "n": 1}
    assert s["macro_accept_length"] == pytest.approx((3.0 + 8.0) / 2)
    assert report["benchmarks"]["gsm8k"]["speedup"] == pytest.approx(6.0 / 5.0)
    log = tmp_path / "termination-log"
    paths = write_report(report, tmp_path / "out", termination_log=str(log))
    assert json.loads(log.read_text()) == json.loads(paths["summary"].read_text())
    for key in ("acceptance_plot", "tau_plot"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["markdown"].read_text()
    assert "| gsm8k | 1 | 2 | 3.000 |" in md and "**macro**" in md and "k=7" in md
    many = {f"bench-{i:03d}-with-a-long-name": v for i, v in enumerate([results["gsm8k"]] * 60)}
    big = build_report(many, algorithm="x", target="t", target_revision=None, checkpoint="c", protocol={})
    with pytest.raises(ValueError, match=str(SUMMARY_LIMIT)):
        summary_json(big)


def test_sharded_ranks_merge_to_the_single_process_result(tmp_path, tiny_llama_target, tokenizer):
    target = tiny_llama_target
    prompts = {
        "a": [BenchmarkPrompt("a", i, [f"question {i}", "again"], i + 1) for i in range(4)],
        "b": [BenchmarkPrompt("b", i, [f"q{i}"], i + 1) for i in range(3)],
    }
    cfg = EngineConfig(num_proposals=3, temperature=1.0, max_new_tokens=6)
    engine = SpeculativeEngine(target, RandomDrafter(target.vocab_size, seed=2), cfg)
    settings = RunSettings(seed=7, all_turns=True, baseline=False, progress=False)
    single, _ = evaluate_benchmarks(engine, tokenizer, prompts, settings, 0, 1)
    for r in range(2):
        res, recs = evaluate_benchmarks(engine, tokenizer, prompts, settings, r, 2)
        write_rank_file(res, recs, tmp_path, r)
    merged, _ = merge_rank_files(tmp_path, 2)
    for name in prompts:
        a, b = single[name][0].to_dict(), merged[name][0].to_dict()
        a.pop("decode_seconds"), b.pop("decode_seconds")
        assert a == b
    assert merged["a"][0].prompts == 4 and merged["a"][0].rounds > 4  # two turns each


def _fake_loaders(monkeypatch, target, draft):
    import deepspec.eval.checkpoints as ck

    monkeypatch.setattr(
        ck, "load_target_and_draft", lambda recipe, checkpoint, device=None: (target, draft, Path(checkpoint))
    )
    from deepspec.testing.tiny import tiny_tokenizer

    monkeypatch.setattr(ck, "load_tokenizer", lambda t: tiny_tokenizer())


class CopyDraft:
    algorithm = "eagle3"

    def __init__(self, model):
        self.model = model

    def as_drafter(self, target):
        return TargetCopyDrafter(self.model, corrupt_every=4)


def test_eval_cli_end_to_end(tmp_path, monkeypatch, capsys, tiny_llama_target):
    from deepspec.cli import main

    bench = tmp_path / "bench"
    bench.mkdir()
    for name, n in (("gsm8k", 3), ("mt-bench", 2)):
        (bench / f"{name}.jsonl").write_text(
            "".join(json.dumps({"turns": [f"{name} {i}", "more"]}) + "\n" for i in range(n))
        )
    _fake_loaders(monkeypatch, tiny_llama_target, CopyDraft(tiny_llama_target.model))
    out, log = tmp_path / "report", tmp_path / "termlog"

    def run_eval(benchmarks: str, new_tokens: int, gate: str, *extra: str) -> int:
        return main(
            [
                "eval",
                "--checkpoint",
                str(tmp_path / "step_1"),
                "--output",
                str(out),
                "--no-progress",
                *extra,
                *("--set", f"evaluation.benchmarks_dir={bench}"),
                *("--set", f"evaluation.benchmarks=[{benchmarks}]"),
                *("--set", f"evaluation.max_new_tokens={new_tokens}"),
                *("--set", f"evaluation.gate.{gate}"),
            ]
        )

    rc = run_eval(
        "gsm8k, mt-bench",
        10,
        "min_accept_length=1.5",
        *("--termination-log", str(log), "--set", "evaluation.temperature=0"),
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["benchmarks"]["gsm8k"]["prompts"] == 3 and report["benchmarks"]["mt-bench"]["prompts"] == 2
    assert report["macro"]["tau"] > 1.5 and report["benchmarks"]["gsm8k"]["speedup"] is not None
    assert json.loads(log.read_text())["macro_accept_length"] == round(report["macro"]["tau"], 4)
    assert (
        (out / "acceptance.png").is_file() and (out / "tau.png").is_file() and (out / "report.md").is_file()
    )
    assert run_eval("gsm8k", 6, "min_accept_length=7.5") == 3  # the gate fails loudly
    assert "gate: FAILED: accepted length" in capsys.readouterr().out
    # max_drop against the serving draft's accepted length: the same rule as the operator's
    rc = run_eval("mt-bench", 6, "max_drop=0.5", "--no-baseline", "--baseline-accept-length", "7.9")
    assert rc == 3 and "below baseline 7.900" in capsys.readouterr().out


def test_eval_cli_calibrates_dspark_confidences(tmp_path, monkeypatch, tiny_llama_target):
    from deepspec.cli import main

    class ConfDraft:
        algorithm = "dspark"

        def as_drafter(self, target):
            return RandomDrafter(target.vocab_size, seed=4, confidence=True)

    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "gsm8k.jsonl").write_text("".join(json.dumps({"turns": [f"p {i}"]}) + "\n" for i in range(6)))
    _fake_loaders(monkeypatch, tiny_llama_target, ConfDraft())
    out = tmp_path / "r"
    rc = main(
        [
            "eval",
            "--checkpoint",
            str(tmp_path / "s"),
            "--output",
            str(out),
            "--no-progress",
            "--no-baseline",
            "--calibrate",
            "--confidence-threshold",
            "0.01",
            "--set",
            f"evaluation.benchmarks_dir={bench}",
            "--set",
            "evaluation.benchmarks=[gsm8k]",
            "--set",
            "evaluation.max_new_tokens=12",
        ]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert "calibration" in report and (out / "calibration.json").is_file()
    assert len(report["calibration"]["temperatures"]) == 7


def test_export_cli_refuses_low_smoke_accept_length(tmp_path, monkeypatch, capsys):
    from deepspec.cli import main
    from deepspec.config import draft_model_config
    from deepspec.models import build_draft
    from deepspec.testing.tiny import tiny_target

    target = tiny_target("llama")
    torch.manual_seed(0)
    draft = build_draft(draft_model_config(algorithm="eagle3"), target)
    _fake_loaders(monkeypatch, target, draft)
    out = tmp_path / "export"
    assert (
        main(
            ["export", "--checkpoint", str(tmp_path / "step_1"), "--output", str(out), "--smoke-tokens", "8"]
        )
        == 3
    )
    assert "refusing to export" in capsys.readouterr().out and not out.exists()
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "step_1"),
                "--output",
                str(out),
                "--force",
                "--format",
                "vllm",
                "--smoke-tokens",
                "8",
            ]
        )
        == 0
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["deepspec"]["export"]["forced"] is True
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in target.layer_ids]
