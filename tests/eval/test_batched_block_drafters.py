"""The batched DFlash/DSpark drafter (one block forward for all rows) against the per-row drafters and the target."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from deepspec.config import draft_model_config
from deepspec.decode.sampling import inverse_cdf
from deepspec.eval.block_batched import BlockBatchedDrafter
from deepspec.eval.engine import EngineConfig, SpeculativeEngine
from deepspec.models import build_draft
from deepspec.testing.tiny import tiny_target

from .batched_checks import (
    PROMPTS,
    check_greedy_rounds_equal_per_row,
    check_refilled_draft,
    check_sampled_rows_independent,
)
from .conftest import reference_greedy
from .test_lossless import PROMPT, chi2_pvalue, exact_joint, sample_engine

ALGORITHMS = ["dflash", "dspark"]


def block_draft(algorithm: str, target):
    """A small random draft; DSpark's Markov head gets random W2 (it starts at zero) so that it matters."""
    kw = {"algorithm": algorithm, "num_layers": 2}
    if algorithm == "dspark":
        kw["markov_rank"] = 16
    torch.manual_seed(0)
    draft = build_draft(draft_model_config(**kw), target).eval()
    if algorithm == "dspark":
        with torch.no_grad():
            draft.markov_head.markov_w2.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    return draft


@pytest.fixture(scope="module", params=ALGORITHMS)
def target_and_draft(request):
    target = tiny_target("llama")
    return target, block_draft(request.param, target)


@torch.no_grad()
def test_batched_proposals_equal_per_row_proposals(target_and_draft):
    """T = 0: every row's block equals the per-row drafter's, after a prefill and after extends of
    different lengths per row (0 = a row that ended stays as it was)."""
    target, draft = target_and_draft
    batched = BlockBatchedDrafter(draft, len(PROMPTS) + 2, 64)  # spare rows: only rows 0..B-1 are used
    per_row = check_greedy_rounds_equal_per_row(target, draft, batched)
    assert batched.context_len.tolist()[: len(PROMPTS)] == [d.cache.length for d in per_row]


@torch.no_grad()
def test_sampled_proposals_are_draws_from_the_per_row_distribution(target_and_draft):
    """T > 0: slot k of a row is the inverse-CDF draw of the row's uniform k from probs[k], and probs[k]
    is the per-row drafter's distribution for that slot (for DSpark: given the row's own earlier draws,
    through the sequential head); a row's proposals do not depend on the rows beside it."""
    target, draft = target_and_draft
    temperature, steps = 0.8, 4
    batched = BlockBatchedDrafter(draft, 3, 64)
    per_row = [draft.as_drafter(target) for _ in range(3)]
    for b, prompt in enumerate(PROMPTS[:3]):
        ids = torch.tensor(prompt)
        feats = target.capture(ids[None]).features[0]
        batched.prefill(b, ids, feats)
        per_row[b].extend(ids, feats)
    anchors = torch.tensor([11, 12, 13])
    u = torch.rand(3, steps, generator=torch.Generator().manual_seed(1))
    got = batched.propose(anchors, steps, temperature, u)
    assert got.probs is not None and got.probs.shape == (3, steps, target.vocab_size)
    torch.testing.assert_close(got.probs.sum(-1), torch.ones(3, steps))
    for k in range(steps):
        assert torch.equal(got.tokens[:, k], inverse_cdf(got.probs[:, k], u[:, k]))
    for b, drafter in enumerate(per_row):
        if draft.algorithm == "dspark":
            logits = drafter.teacher_forced_logits(int(anchors[b]), got.tokens[b].tolist())
        else:
            logits = drafter.block_logits(int(anchors[b]))[:steps]
        torch.testing.assert_close(got.probs[b], torch.softmax(logits / temperature, dim=-1))
    alone = batched.propose(anchors[:1], steps, temperature, u[:1])
    assert torch.equal(alone.tokens[0], got.tokens[0])
    torch.testing.assert_close(alone.probs[0], got.probs[0])


def test_more_proposals_than_a_block_makes_is_refused(target_and_draft):
    _, draft = target_and_draft
    batched = BlockBatchedDrafter(draft, 1, 64)
    with pytest.raises(ValueError, match="num_proposals"):
        batched.propose(torch.tensor([3]), draft.proposals_per_block + 1, 0.0)


def engines(target, draft, cfg):
    """The engine on the batched drafter, and on one per-row drafter per row (the old path)."""
    batched = SpeculativeEngine(target, draft.as_drafter(target), cfg)
    per_row = SpeculativeEngine(
        target,
        draft.as_drafter(target),
        replace(cfg, batched_drafter=False),
        drafter_factory=lambda: draft.as_drafter(target),
    )
    return batched, per_row


@pytest.fixture(scope="module", params=ALGORITHMS)
def agreeing_target_and_draft(request):
    """An untrained draft accepts nothing on a random target. Here the target's greedy choice is often
    token 0 (a small LM head but for row 0), and the draft, which reads the target's LM head, proposes
    token 0 whenever its own hidden state leans that way (DSpark's Markov head adds a bias of 4 to
    token 0 after any token): rounds accept 0..gamma tokens."""
    target = tiny_target("llama")
    draft = block_draft(request.param, target)
    with torch.no_grad():
        w = target.lm_head.weight
        w.mul_(0.05)
        w[0] = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(1))
        if request.param == "dspark":
            head = draft.markov_head
            head.markov_w1.weight[:, 0] = 1.0
            head.markov_w2.weight[0] = 0.0
            head.markov_w2.weight[0, 0] = 4.0
    return target, draft


@pytest.mark.parametrize("batch", [1, 4])
def test_engine_greedy_equals_per_row_path_and_target(agreeing_target_and_draft, batch):
    target, draft = agreeing_target_and_draft
    stops = (47,)  # row 1 stops early, the others run to max_new_tokens
    # DSpark's recorded confidences need the per-row path; DFlash records its rounds batched
    record = getattr(draft, "confidence_head", None) is None
    cfg = EngineConfig(
        num_proposals=4, temperature=0.0, max_new_tokens=20, stop_token_ids=stops, record_rounds=record
    )
    fast, slow = engines(target, draft, cfg)
    prompts = PROMPTS[:batch]
    got = fast.generate_batch(prompts)
    assert fast._batched is not None and isinstance(fast._batched[1], BlockBatchedDrafter)
    want = slow.generate_batch(prompts)
    assert slow._batched is None
    for g, w, p in zip(got, want, prompts, strict=True):
        assert (g.tokens, g.finish_reason) == (w.tokens, w.finish_reason)
        assert (g.stats.rounds, g.stats.accepted) == (w.stats.rounds, w.stats.accepted)
        assert [(r.proposed, r.accepted) for r in g.rounds] == [(r.proposed, r.accepted) for r in w.rounds]
        ref = reference_greedy(target.model, p, 20)
        assert g.tokens == ref[: len(g.tokens)]
    if batch > 1:
        assert len({len(r.tokens) for r in got}) > 1  # rows really stop at different rounds
        assert len({r.stats.accepted for r in got}) > 1  # and accept differently
    assert sum(r.stats.accepted for r in got) > 0  # some proposals were accepted: the drafts are compared


def test_engine_keeps_the_per_row_drafter_where_the_batched_one_cannot_serve(agreeing_target_and_draft):
    """More proposals than a block holds, or DSpark's confidences recorded: the per-row path runs."""
    target, draft = agreeing_target_and_draft
    too_many = EngineConfig(num_proposals=draft.proposals_per_block + 1, temperature=0.0, max_new_tokens=4)
    engine = SpeculativeEngine(target, draft.as_drafter(target), too_many)
    engine.generate(PROMPTS[0])
    assert engine._batched is None
    recorded = SpeculativeEngine(
        target, draft.as_drafter(target), EngineConfig(temperature=0.0, max_new_tokens=4, record_rounds=True)
    )
    result = recorded.generate(PROMPTS[0])
    if getattr(draft, "confidence_head", None) is not None:
        assert recorded._batched is None and result.rounds[0].confidence is not None
    else:
        assert recorded._batched is not None


def test_refilled_rows_equal_single_prompt_results(agreeing_target_and_draft):
    """More prompts than rows, answers of different lengths, the batched DFlash/DSpark drafter: each prompt's
    tokens and counters are those it gets alone (T = 0)."""
    check_refilled_draft(*agreeing_target_and_draft, temperature=0.0)


def test_refilled_sampled_rows_do_not_depend_on_their_neighbours(target_and_draft):
    check_refilled_draft(*target_and_draft, temperature=1.0)


def test_engine_sampled_rows_do_not_depend_on_their_neighbours(target_and_draft):
    check_sampled_rows_independent(*target_and_draft, BlockBatchedDrafter)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_t1_output_distribution_equals_target(algorithm):
    """T = 1 with the batched block drafter (a peaked 8-token target): exact target samples. Rows of 50
    in lockstep; a row's tokens equal its single-prompt tokens (test above), so batch 1 is covered."""
    batch = 50
    target = tiny_target("llama", vocab=8, hidden=32, layers=2, heads=2, kv_heads=1, seed=3)
    with torch.no_grad():
        target.lm_head.weight.mul_(40.0)
    draft = block_draft(algorithm, target)
    cfg = EngineConfig(num_proposals=3, temperature=1.0, max_new_tokens=3)
    engine = SpeculativeEngine(target, draft.as_drafter(target), cfg)
    samples = sample_engine(engine, 1500, 3, f"{algorithm}-batched-{batch}", batch)
    assert isinstance(engine._batched[1], BlockBatchedDrafter)
    assert chi2_pvalue(samples, exact_joint(target, PROMPT, 3)) > 1e-3
