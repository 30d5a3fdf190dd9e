"""The engine with the real (untrained) Eagle3 / DFlash / DSpark drafters on tiny random targets."""

from __future__ import annotations

import pytest
import torch

from deepspec.config import draft_model_config
from deepspec.eval.engine import EngineConfig, SpeculativeEngine, prompt_generator
from deepspec.eval.scheduler import CostCurve, PrefixScheduler
from deepspec.testing.tiny import tiny_target

from .conftest import reference_greedy

PROMPTS = [[1, 5, 9, 17, 33, 5, 9], [1, 40, 41, 42]]


def make(algorithm: str, arch: str = "llama", **draft_kwargs):
    from deepspec.models import build_draft
    from deepspec.target_model.model import default_layer_ids

    target = tiny_target(arch, layer_ids=default_layer_ids(4, algorithm))
    torch.manual_seed(0)
    draft = build_draft(draft_model_config(algorithm=algorithm, **draft_kwargs), target)
    draft.eval()
    return target, draft


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("algorithm", ["eagle3", "dflash", "dspark"])
def test_greedy_lossless_untrained(algorithm, arch):
    kwargs = {"num_layers": 2} if algorithm != "eagle3" else {}
    target, draft = make(algorithm, arch, **kwargs)
    engine = SpeculativeEngine(
        target, draft.as_drafter(target), EngineConfig(num_proposals=7, temperature=0.0, max_new_tokens=20)
    )
    for prompt in PROMPTS:
        out = engine.generate(prompt)
        assert out.tokens == reference_greedy(target.model, prompt, 20)
        assert out.stats.rounds >= 1


@pytest.mark.parametrize("algorithm", ["eagle3", "dflash", "dspark"])
def test_sampling_runs_and_is_reproducible(algorithm):
    kwargs = {"num_layers": 2} if algorithm != "eagle3" else {}
    target, draft = make(algorithm, **kwargs)
    engine = SpeculativeEngine(
        target, draft.as_drafter(target), EngineConfig(num_proposals=7, temperature=1.0, max_new_tokens=16)
    )
    a = engine.generate(PROMPTS[0], prompt_generator(0, "x", 0))
    b = engine.generate(PROMPTS[0], prompt_generator(0, "x", 0))
    assert a.tokens == b.tokens and len(a.tokens) == 16


def test_dspark_confidence_drives_threshold_and_scheduler():
    target, draft = make("dspark", num_layers=2)
    drafter = draft.as_drafter(target)
    sched = PrefixScheduler(CostCurve([1.0, 1.05, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6]))
    cfg = EngineConfig(num_proposals=7, temperature=0.0, max_new_tokens=20, confidence_threshold=0.05)
    engine = SpeculativeEngine(target, drafter, cfg, scheduler=sched)
    out = engine.generate(PROMPTS[0])
    assert out.tokens == reference_greedy(target.model, PROMPTS[0], 20)
    assert sched.decisions, "DSpark proposals carry confidences, so the scheduler must be consulted"
