"""The Evaluator (paths through the run layout, s3:// included), the shared summary and acceptance gate,
and the one device rule."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from deepspec.config import GateConfig, Recipe
from deepspec.devices import pick_device
from deepspec.eval.summary import SUMMARY_LIMIT, EvalSummary, gate_decision

# ------------------------------------------------------------------------------------------------
# The acceptance gate: one rule for `deepspec eval` and the operator
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tau", "gate", "baseline", "passed", "reason"),
    [
        (None, {}, None, False, "no evaluation result"),
        (2.0, {"min_accept_length": 2.5}, None, False, "accepted length 2.000 < min_accept_length 2.5"),
        (2.5, {"min_accept_length": 2.5}, None, True, "accepted length 2.500"),
        (2.6, {"max_drop": 0.3}, 3.0, False, "dropped more than 0.3 below baseline 3.000"),
        (2.7, {"max_drop": 0.3}, 3.0, True, "accepted length 2.700 (baseline 3.000)"),
        (1.1, {"max_drop": 0.3}, None, True, "max_drop not checked: no baseline"),
        (3.1, {"min_accept_length": 3.0, "max_drop": 0.1}, 3.5, False, "below baseline 3.500"),
    ],
)
def test_gate_rules(tau, gate, baseline, passed, reason):
    summary = None if tau is None else EvalSummary(macro_accept_length=tau)
    decision = gate_decision(summary, GateConfig(**gate), baseline)
    assert decision.passed is passed and reason in decision.reason
    assert gate_decision(tau, GateConfig(**gate), baseline) == decision  # a bare accepted length too


def test_summary_round_trip_and_limit():
    report = {
        "algorithm": "dspark",
        "target_revision": "abc",
        "checkpoint": "s3://b/run/draft/step_4",
        "macro": {"tau": 2.345678},
        "benchmarks": {"gsm8k": {"tau": 2.345678, "acceptance_ratio": 0.41234567, "prompts": 7}},
    }
    s = EvalSummary.from_report(report)
    assert s.macro_accept_length == 2.3457 and s.benchmarks["gsm8k"].n == 7
    assert EvalSummary.parse(s.to_json()) == s
    big = EvalSummary(macro_accept_length=2.0, checkpoint="x" * SUMMARY_LIMIT)
    with pytest.raises(ValueError, match="termination-log limit"):
        big.to_json()


def test_summary_module_does_not_import_torch():
    """The operator imports it: no torch (or transformers) at import time."""
    code = "import sys, deepspec.eval.summary; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------------
# One device rule
# ------------------------------------------------------------------------------------------------


def test_pick_device_rule(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(None) == torch.device("cpu") == pick_device("auto") == pick_device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="not a device"):
        pick_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device(None) == torch.device("cuda", 3) == pick_device("cuda")  # one GPU per process
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device("auto", local_rank=0) == torch.device("cuda", 0)


# ------------------------------------------------------------------------------------------------
# The Evaluator on an s3:// storage root (moto server)
# ------------------------------------------------------------------------------------------------


def _upload_checkpoint(client, bucket: str, prefix: str, target, draft_cfg, tmp_path) -> None:
    """A step checkpoint as training leaves it: the draft's files, trainer state, optimizer, ``latest``."""
    from safetensors.torch import save_file

    from deepspec.models import build_draft

    torch.manual_seed(0)
    draft = build_draft(draft_cfg, target)
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in draft.state_dict().items()}, str(weights))
    step = f"{prefix}/step_3"
    client.put_object(
        Bucket=bucket, Key=f"{step}/config.json", Body=json.dumps(draft.draft_config()).encode()
    )
    client.upload_file(str(weights), bucket, f"{step}/model.safetensors")
    client.put_object(Bucket=bucket, Key=f"{step}/trainer_state.pt", Body=b"not needed by eval")
    client.put_object(Bucket=bucket, Key=f"{step}/optimizer/__0_0.distcp", Body=b"not needed by eval")
    client.put_object(Bucket=bucket, Key=f"{prefix}/latest", Body=b"step_3\n")


def test_evaluator_reads_checkpoint_from_s3_and_writes_report_to_s3(tmp_path, monkeypatch, moto_s3_endpoint):
    import boto3

    from deepspec.eval.evaluator import EvalOptions, Evaluator
    from deepspec.layout import RunLayout
    from deepspec.testing.tiny import save_tiny_target, tiny_recipe, tiny_target

    bucket = "eval-s3-root"
    client = boto3.client("s3", endpoint_url=moto_s3_endpoint)
    client.create_bucket(Bucket=bucket)
    model_dir = save_tiny_target(str(tmp_path / "target"))
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "gsm8k.jsonl").write_text(
        "".join(json.dumps({"turns": [f"add {i} and 2"]}) + "\n" for i in range(3))
    )
    raw = tiny_recipe(model_dir, "regenerated.jsonl", "draft")
    raw["storage"] = {"root": f"s3://{bucket}/run", "s3_endpoint_url": moto_s3_endpoint}
    raw["evaluation"] = {
        "benchmarks_dir": str(bench),
        "benchmarks": ["gsm8k"],
        "output_dir": "eval",
        "max_new_tokens": 6,
        "temperature": 0.0,
        "gate": {"min_accept_length": 1.0},
    }
    recipe = Recipe.model_validate(raw)
    _upload_checkpoint(client, bucket, "run/draft", tiny_target("llama"), recipe.draft, tmp_path)

    cache, cwd = tmp_path / "cache", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("DEEPSPEC_CACHE", str(cache))
    monkeypatch.chdir(cwd)
    layout = RunLayout.from_recipe(recipe)
    assert layout.checkpoint() == f"s3://{bucket}/run/draft/latest"  # what `deepspec run` passes

    evaluator = Evaluator(recipe, EvalOptions(checkpoint=layout.checkpoint(), device="cpu", progress=False))
    outcome = evaluator.run()

    assert outcome is not None and outcome.gate.passed
    assert outcome.report["checkpoint"] == f"s3://{bucket}/run/draft/step_3"  # the remote step, not a cache
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="run/eval/")["Contents"]}
    assert {f"run/eval/{n}" for n in ("report.json", "report.md", "summary.json", "tau.png")} <= keys
    remote = client.get_object(Bucket=bucket, Key="run/eval/summary.json")["Body"].read().decode()
    assert EvalSummary.parse(remote) == outcome.summary
    downloaded = {p.name for p in cache.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors"} <= downloaded
    assert not downloaded & {"trainer_state.pt", "__0_0.distcp"}  # only what a draft needs
    assert list(cwd.iterdir()) == []  # nothing written in the working directory


def test_evaluator_ngram_on_a_local_storage_root(tmp_path, monkeypatch):
    """Model-free drafting needs no checkpoint; the report lands under storage.root, not the working dir."""
    from deepspec.eval.evaluator import EvalOptions, EvalSetupError, Evaluator
    from deepspec.testing.tiny import save_tiny_target, tiny_recipe

    model_dir = save_tiny_target(str(tmp_path / "target"))
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "code.jsonl").write_text(json.dumps({"turns": ["repeat: a b c a b c a b"]}) + "\n")
    raw = tiny_recipe(model_dir, "regenerated.jsonl", "draft")
    raw["storage"] = {"root": str(tmp_path / "root")}
    raw["evaluation"] = {"benchmarks_dir": str(bench), "benchmarks": ["code"], "output_dir": "eval"}
    raw["evaluation"].update(max_new_tokens=8, temperature=0.0)
    recipe = Recipe.model_validate(raw)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(EvalSetupError, match="--checkpoint is required"):
        Evaluator(recipe, EvalOptions())

    outcome = Evaluator(recipe, EvalOptions(drafter="ngram", baseline=False, progress=False)).run()

    assert (
        outcome is not None
        and outcome.report["algorithm"] == "ngram"
        and outcome.report["checkpoint"] is None
    )
    assert outcome.report_dir == str(tmp_path / "root" / "eval")
    assert EvalSummary.parse((tmp_path / "root" / "eval" / "summary.json").read_text()) == outcome.summary
    assert outcome.report["protocol"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert list(cwd.iterdir()) == []
