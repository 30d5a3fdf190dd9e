"""Exports against the engines' rules and through the engine-semantics drafter (issue 10's acceptance).

A tiny draft of each algorithm is trained for a few dozen steps on its target's own greedy continuations,
exported for each engine, and driven through :class:`EngineDrafter` (reading only the export folder): its
greedy proposals equal our drafter's in every round, so the accepted length is the same. Then each defect
found in the engines' audit is reintroduced on purpose: ``--check`` names the broken rule and its engine
source, and the smoke gate (engine drafter vs ours) fails.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepspec.config import draft_model_config
from deepspec.eval.engine import EngineConfig, SpeculativeEngine
from deepspec.eval.metrics import AcceptanceStats
from deepspec.export.engines import check_export
from deepspec.export.exporter import export_draft, rounded_twin, smoke_test, write_export
from deepspec.models.draft import DraftBatch
from deepspec.testing.tiny import tiny_target

DRAFTS = {
    "eagle3": {"ttt_steps": 3},
    "dflash": {"num_layers": 1, "block_size": 4, "num_anchors": 32},
    "dspark": {"num_layers": 1, "block_size": 4, "num_anchors": 32, "markov_rank": 16},
}
PROMPTS = [[1, 17, 90, 33, 5], [1, 60, 61, 12], [1, 7, 7, 100]]
ENGINES = ["sglang", "vllm"]


def _greedy_batch(target, n: int = 8, new: int = 28) -> DraftBatch:
    """The target's own greedy continuations of random prompts: a draft learns them quickly."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.cat([torch.ones(n, 1, dtype=torch.long), torch.randint(3, 120, (n, 4), generator=g)], 1)
    with torch.no_grad():
        ids = target.model.generate(prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    attn = torch.ones_like(ids)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, prompts.shape[1] :] = 1
    out = target.capture(ids, attn)
    return DraftBatch(ids, attn, loss_mask, out.features, out.last_hidden)


def train_tiny(algorithm: str, layer_ids: list[int] | None = None, steps: int = 40, **overrides):
    from deepspec.models import build_draft

    target = tiny_target("qwen3", layer_ids=layer_ids or [0, 1, 2])
    batch = _greedy_batch(target)
    torch.manual_seed(0)
    draft = build_draft(draft_model_config(algorithm=algorithm, **{**DRAFTS[algorithm], **overrides}), target)
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = draft(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return target, draft.eval()


@pytest.fixture(scope="module")
def trained():
    cache: dict[str, tuple] = {}

    def get(algorithm: str):
        if algorithm not in cache:
            cache[algorithm] = train_tiny(algorithm)
        return cache[algorithm]

    return get


def our_accept_length(target, draft) -> float:
    """Accepted length of our own drafter (weights rounded as exported) on the smoke prompts."""
    engine = SpeculativeEngine(
        target,
        rounded_twin(draft, torch.bfloat16).as_drafter(),
        EngineConfig(num_proposals=7, temperature=0.0, max_new_tokens=16),
    )
    stats = AcceptanceStats()
    for p in PROMPTS:
        stats += engine.generate(p).stats
    return stats.tau


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("algorithm", ["eagle3", "dflash", "dspark"])
def test_engine_drafter_proposes_what_ours_proposes(tmp_path, trained, algorithm, engine):
    target, draft = trained(algorithm)
    out = export_draft(draft, tmp_path / "export", engine)
    assert check_export(out, engine) == []
    result = smoke_test(target, draft, out, engine, PROMPTS, max_new_tokens=16)
    assert result.error is None and result.rounds > 0
    assert result.agreement == 1.0, result  # same greedy proposals in every round
    assert result.accept_length == pytest.approx(our_accept_length(target, draft))
    assert result.accept_length > 1.2, result  # trained: the comparison is not between two random drafts
    assert result.passed(floor=1.2)


# --------------------------------------------------------------------------------------------------
# Each defect of the audit, reintroduced on purpose
# --------------------------------------------------------------------------------------------------


def _edit_weights(folder, fn: Callable[[dict], None]) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    fn(weights)
    save_file(weights, str(folder / "model.safetensors"))


def _edit_config(folder, fn: Callable[[dict], None]) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _old_dflash_offset(tmp_path, engine):
    target, draft = train_tiny("dflash", steps=0)
    draft.anchor_predicts = True  # trained the old way: slot k predicts anchor+k+1 from the anchor's slot
    write_export(draft, tmp_path / "x", engine)
    return target, draft


def _old_markov_names(tmp_path, engine):
    target, draft = train_tiny("dspark", steps=3)
    write_export(draft, tmp_path / "x", engine)
    _edit_weights(tmp_path / "x", lambda w: [w.__setitem__(f"markov_head.w{i}.weight",
                                                           w.pop(f"markov_head.markov_w{i}.weight")) for i in (1, 2)])  # fmt: skip
    return target, draft


def _dspark_draft_model_for_vllm(tmp_path, engine):
    target, draft = train_tiny("dspark", steps=3)
    write_export(draft, tmp_path / "x", engine)
    _edit_config(tmp_path / "x", lambda c: c.__setitem__("architectures", ["DSparkDraftModel"]))
    return target, draft


def _unsorted_layer_ids(tmp_path, engine):
    target, draft = train_tiny("eagle3", layer_ids=[3, 0])
    write_export(draft, tmp_path / "x", engine)
    return target, draft


def _duplicate_layer_ids(tmp_path, engine):
    target, draft = train_tiny("eagle3", layer_ids=[1, 1, 2], steps=3)
    write_export(draft, tmp_path / "x", engine)
    return target, draft


def _missing_markov_tensor(tmp_path, engine):
    target, draft = train_tiny("dspark", steps=3)
    write_export(draft, tmp_path / "x", engine)
    _edit_weights(tmp_path / "x", lambda w: w.pop("markov_head.markov_w2.weight"))
    return target, draft


def _missing_vllm_layer_key(tmp_path, engine):
    target, draft = train_tiny("eagle3", layer_ids=[1, 3])
    write_export(draft, tmp_path / "x", engine)
    _edit_config(tmp_path / "x", lambda c: c.pop("eagle_aux_hidden_state_layer_ids"))
    return target, draft


# (defect, engine, rule broken, engine file cited by the rule)
DEFECTS = [
    (_old_dflash_offset, "sglang", "dflash-slot-convention", "speculative/dflash_worker_v2.py"),
    (_old_dflash_offset, "vllm", "dflash-slot-convention", "v1/spec_decode/utils.py"),
    (_old_markov_names, "sglang", "weight-names", "models/dflash.py"),
    (_old_markov_names, "vllm", "dspark-markov-weights", "qwen3_dspark.py"),
    (_dspark_draft_model_for_vllm, "vllm", "architecture", "model_executor/models/registry.py"),
    (_unsorted_layer_ids, "sglang", "layer-ids-sorted-unique", "models/llama.py"),
    (_unsorted_layer_ids, "sglang", "eagle3-three-aux-layers", "models/llama_eagle3.py"),
    (_duplicate_layer_ids, "vllm", "layer-ids-sorted-unique", "qwen3_dflash.py"),
    (_missing_markov_tensor, "sglang", "dspark-markov-weights", "models/dspark.py"),
    (_missing_markov_tensor, "vllm", "dspark-markov-weights", "qwen3_dspark.py"),
    (_missing_vllm_layer_key, "vllm", "eagle3-vllm-layer-shift", "v1/worker/gpu_model_runner.py"),
]


@pytest.mark.parametrize(
    ("defect", "engine", "rule", "source"), DEFECTS, ids=lambda v: getattr(v, "__name__", v)
)
def test_defect_fails_check_and_smoke_gate(tmp_path, capsys, defect, engine, rule, source):
    from deepspec.cli import main

    target, draft = defect(tmp_path, engine)
    folder = tmp_path / "x"
    violations = check_export(folder, engine)
    named = [str(v) for v in violations if v.rule.name == rule]
    assert named, [str(v) for v in violations]
    assert source in named[0] and f"[{engine}:{rule}]" in named[0]
    assert main(["export", "--check", engine, str(folder)]) == 4
    assert f"[{engine}:{rule}]" in capsys.readouterr().out
    result = smoke_test(target, draft, folder, engine, PROMPTS[:2], max_new_tokens=12)
    assert not result.passed(floor=1.0), result
    assert result.error is not None or result.agreement < 1.0


def test_check_cli_passes_a_good_export(tmp_path, capsys, trained):
    from deepspec.cli import main

    _, draft = trained("dspark")
    out = export_draft(draft, tmp_path / "e", "vllm")
    assert main(["export", "--check", "vllm", str(out)]) == 0
    assert "passes every vllm rule" in capsys.readouterr().out
    assert main(["export", "--check", "sglang", str(out)]) == 0  # SGLang registers Qwen3DSparkModel too
