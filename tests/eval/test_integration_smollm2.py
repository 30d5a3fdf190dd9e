"""Integration on the real SmolLM2-135M-Instruct target (CPU).

1. Greedy speculative output is token-for-token the target's own greedy output for untrained Eagle3,
   DFlash and DSpark drafts.
2. A draft trained briefly (deepspec.train.Trainer) reaches a higher accepted length than the same
   draft untrained, and at least 1.3, on a small gsm8k subset; the report files and plots are written.
   Measured (2 CPUs, greedy, 3 gsm8k test prompts x 48 tokens, 2026-11-22): trained Eagle3 tau 1.439
   vs untrained 1.000 after 40 steps on 32 greedy SmolLM2 answers to gsm8k-train prompts (the
   session-scoped training in tests/conftest.py, shared with tests/train/test_learning.py).
   Re-measured 2026-12-02 with that training reading the offline float32 feature cache: tau 1.410.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from deepspec.target_model.files import resolve_model_path

    path = resolve_model_path("smollm2")
    return path, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def target_greedy():
    """``target_greedy(target, ids)``: the target's own greedy continuation (HF ``generate``).

    Computed once per prompt: every algorithm's test loads the same SmolLM2 weights.
    """
    done: dict[tuple[int, ...], list[int]] = {}

    def get(target, ids: list[int]) -> list[int]:
        if tuple(ids) not in done:
            out = target.model.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )
            done[tuple(ids)] = out[0, len(ids) :].tolist()
        return done[tuple(ids)]

    return get


def _target(path: str, algorithm: str):
    from deepspec.target_model.model import TargetModel

    return TargetModel.from_pretrained(path, None, algorithm, device="cpu", dtype=torch.float32)


def _prompts(tokenizer, shared_dir, n: int, name: str = "gsm8k") -> list[list[int]]:
    from deepspec.data.template import render_prompt

    lines = (shared_dir / "datasets" / "eval" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [
        render_prompt(
            tokenizer, [{"role": "user", "content": json.loads(x)["turns"][0]}], {"enable_thinking": False}
        )
        for x in lines
    ]


@pytest.mark.parametrize("algorithm", ["eagle3", "dflash", "dspark"])
def test_greedy_lossless_on_smollm2(smollm2, shared_dir, target_greedy, algorithm):
    from deepspec.config import draft_model_config
    from deepspec.eval.engine import EngineConfig, SpeculativeEngine
    from deepspec.models import build_draft

    path, tok = smollm2
    target = _target(path, algorithm)
    torch.manual_seed(0)
    draft = build_draft(draft_model_config(algorithm=algorithm), target).eval()
    cfg = EngineConfig(num_proposals=7, temperature=0.0, max_new_tokens=NEW_TOKENS)
    engine = SpeculativeEngine(target, draft.as_drafter(target), cfg)
    for ids in _prompts(tok, shared_dir, 2, "mt-bench"):
        assert engine.generate(ids).tokens == target_greedy(target, ids)


def test_trained_draft_beats_untrained(smollm2, smollm2_trained, tmp_path):
    from deepspec.eval.benchmarks import load_benchmarks
    from deepspec.eval.checkpoints import load_target_and_draft
    from deepspec.eval.engine import EngineConfig, SpeculativeEngine
    from deepspec.eval.report import build_report, write_report
    from deepspec.eval.runner import RunSettings, evaluate_benchmarks, stop_token_ids
    from deepspec.models import build_draft

    _, tok = smollm2
    recipe, out = smollm2_trained("eagle3")  # trained once per session, shared with tests/train

    target, draft, ckpt = load_target_and_draft(recipe, out, "cpu")
    torch.manual_seed(0)
    untrained = build_draft(recipe.draft, target).eval()
    ev = recipe.evaluation
    cfg = EngineConfig(
        num_proposals=7,
        temperature=0.0,
        max_new_tokens=ev.max_new_tokens,
        stop_token_ids=stop_token_ids(tok, target.config),
    )
    benches = load_benchmarks(ev)
    settings = RunSettings(baseline=True, progress=False)
    trained_res, _ = evaluate_benchmarks(
        SpeculativeEngine(target, draft.as_drafter(target), cfg), tok, benches, settings
    )
    base_res, _ = evaluate_benchmarks(
        SpeculativeEngine(target, untrained.as_drafter(target), cfg),
        tok,
        benches,
        RunSettings(baseline=False, progress=False),
    )
    tau_trained, tau_untrained = trained_res["gsm8k"][0].tau, base_res["gsm8k"][0].tau
    print(f"gsm8k tau: trained {tau_trained:.3f} vs untrained {tau_untrained:.3f}")
    assert tau_trained > tau_untrained
    assert tau_trained >= 1.3

    report = build_report(
        trained_res,
        algorithm="eagle3",
        target="smollm2",
        target_revision=None,
        checkpoint=str(ckpt),
        protocol={"temperature": 0.0, "num_proposals": 7},
    )
    paths = write_report(report, tmp_path / "report")
    for p in paths.values():
        assert Path(p).stat().st_size > 0
    assert paths["tau_plot"].read_bytes()[:4] == b"\x89PNG"
