"""The batched Eagle3 drafter (one draft forward for all rows) against the per-row drafter and the target."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from deepspec.config import draft_model_config
from deepspec.decode.sampling import inverse_cdf
from deepspec.eval.eagle3_batched import Eagle3BatchedDrafter
from deepspec.eval.engine import EngineConfig, SpeculativeEngine
from deepspec.testing.tiny import tiny_target

from .batched_checks import (
    PROMPTS,
    check_greedy_rounds_equal_per_row,
    check_refilled_draft,
    check_sampled_rows_independent,
)
from .conftest import reference_greedy
from .test_lossless import PROMPT, chi2_pvalue, exact_joint, sample_engine


def eagle3(target):
    from deepspec.models import build_draft

    torch.manual_seed(0)
    return build_draft(draft_model_config(algorithm="eagle3"), target).eval()


def eagle3_target(**kwargs):
    return tiny_target("llama", **kwargs)  # the target layers default to Eagle3's choice


@pytest.fixture(scope="module")
def target_and_draft():
    target = eagle3_target()
    return target, eagle3(target)


@torch.no_grad()
def test_batched_proposals_equal_per_row_proposals(target_and_draft):
    """T = 0: every row's proposals equal the per-row drafter's, after a prefill and after extends of
    different lengths per row (0 = a row that ended stays as it was)."""
    target, draft = target_and_draft
    batched = Eagle3BatchedDrafter(draft, len(PROMPTS) + 2, 64)  # spare rows: only rows 0..B-1 are used
    per_row = check_greedy_rounds_equal_per_row(target, draft, batched)
    assert batched.num_pairs.tolist()[: len(PROMPTS)] == [d.num_pairs for d in per_row]


@torch.no_grad()
def test_sampled_proposals_are_draws_from_the_returned_distribution(target_and_draft):
    """T > 0: token k of a row is the inverse-CDF draw of the row's uniform k from probs[k] (which sums to
    one over the target vocabulary), and a row's proposals do not depend on the rows beside it."""
    target, draft = target_and_draft
    batched = Eagle3BatchedDrafter(draft, 3, 64)
    for b, prompt in enumerate(PROMPTS[:3]):
        ids = torch.tensor(prompt)
        batched.prefill(b, ids, target.capture(ids[None]).features[0])
    anchors = torch.tensor([11, 12, 13])
    u = torch.rand(3, 4, generator=torch.Generator().manual_seed(1))
    got = batched.propose(anchors, 4, 1.0, u)
    assert got.probs is not None and got.probs.shape == (3, 4, target.vocab_size)
    torch.testing.assert_close(got.probs.sum(-1), torch.ones(3, 4))
    for k in range(4):
        assert torch.equal(got.tokens[:, k], inverse_cdf(got.probs[:, k], u[:, k]))
    alone = batched.propose(anchors[:1], 4, 1.0, u[:1])
    assert torch.equal(alone.tokens[0], got.tokens[0])
    torch.testing.assert_close(alone.probs[0], got.probs[0])


def engines(target, draft, cfg):
    """The engine on the batched drafter, and on one per-row drafter per row (the old path)."""
    batched = SpeculativeEngine(target, draft.as_drafter(target), cfg)
    old_cfg = replace(cfg, batched_drafter=False)
    per_row = SpeculativeEngine(
        target, draft.as_drafter(target), old_cfg, drafter_factory=lambda: draft.as_drafter(target)
    )
    return batched, per_row


@pytest.fixture(scope="module")
def agreeing_target_and_draft():
    """An untrained draft accepts nothing on a random target; here the target's greedy choice is often
    token 0, which a draft with a zero LM head always proposes: rounds accept 0..gamma tokens."""
    target = eagle3_target()
    draft = eagle3(target)
    with torch.no_grad():
        w = target.lm_head.weight
        w.mul_(0.05)
        w[0] = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(1))
        draft.lm_head.weight.zero_()
    return target, draft


@pytest.mark.parametrize("batch", [1, 4])
def test_engine_greedy_equals_per_row_path_and_target(agreeing_target_and_draft, batch):
    target, draft = agreeing_target_and_draft
    stops = (47,)  # row 1 stops early, the others run to max_new_tokens
    cfg = EngineConfig(
        num_proposals=4, temperature=0.0, max_new_tokens=20, stop_token_ids=stops, record_rounds=True
    )
    fast, slow = engines(target, draft, cfg)
    prompts = PROMPTS[:batch]
    got = fast.generate_batch(prompts)
    assert fast._batched is not None  # the batched drafter ran
    want = slow.generate_batch(prompts)
    assert slow._batched is None
    for g, w, p in zip(got, want, prompts, strict=True):
        assert (g.tokens, g.finish_reason) == (w.tokens, w.finish_reason)
        assert (g.stats.rounds, g.stats.accepted) == (w.stats.rounds, w.stats.accepted)
        assert g.rounds == w.rounds  # per-round records (proposed, accepted) as on the per-row path
        ref = reference_greedy(target.model, p, 20)
        assert g.tokens == ref[: len(g.tokens)]
    if batch > 1:
        assert len({len(r.tokens) for r in got}) > 1  # rows really stop at different rounds
    assert sum(r.stats.accepted for r in got) > 0  # some proposals were accepted: the drafts are compared


def test_refilled_rows_equal_single_prompt_results(agreeing_target_and_draft):
    """More prompts than rows, answers of different lengths, the batched Eagle3 drafter: each prompt's
    tokens and counters are those it gets alone (T = 0)."""
    check_refilled_draft(*agreeing_target_and_draft, temperature=0.0)


def test_refilled_sampled_rows_do_not_depend_on_their_neighbours(target_and_draft):
    check_refilled_draft(*target_and_draft, temperature=1.0)


def test_engine_sampled_rows_do_not_depend_on_their_neighbours(target_and_draft):
    check_sampled_rows_independent(*target_and_draft, Eagle3BatchedDrafter)


def test_t1_output_distribution_equals_target():
    """T = 1 with the batched Eagle3 drafter (a peaked 8-token target): exact target samples. Rows of 50
    in lockstep; a row's tokens equal its single-prompt tokens (test above), so batch 1 is covered."""
    batch = 50
    vocab = 8
    target = eagle3_target(vocab=vocab, hidden=32, layers=2, heads=2, kv_heads=1, seed=3)
    with torch.no_grad():
        target.lm_head.weight.mul_(40.0)
    draft = eagle3(target)
    cfg = EngineConfig(num_proposals=3, temperature=1.0, max_new_tokens=3)
    engine = SpeculativeEngine(target, draft.as_drafter(target), cfg)
    samples = sample_engine(engine, 1500, 3, f"eagle3-batched-{batch}", batch)
    assert engine._batched is not None
    joint = exact_joint(target, PROMPT, 3)
    assert chi2_pvalue(samples, joint) > 1e-3
