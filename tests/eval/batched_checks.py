"""The scenario every batched drafter is checked on against its per-row drafter (Eagle3 and the
DFlash/DSpark block drafter): prefill rows of different prompt lengths, then rounds of greedy
proposals and extends of a different length per row."""

from __future__ import annotations

import torch

PROMPTS = [[1, 5, 9, 17, 33, 5, 9], [1, 40, 41, 42], [1, 7], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


@torch.no_grad()
def check_greedy_rounds_equal_per_row(target, draft, batched, steps: int = 5, rounds: int = 3) -> list:
    """Assert that every row's T = 0 proposals equal its per-row drafter's in every round, after a
    prefill and after extends of ``[steps + 1, 1, 0, 3]`` positions (0 = a row that ended stays as it
    was); returns the per-row drafters, so that the caller can compare the committed state."""
    per_row = [draft.as_drafter(target) for _ in PROMPTS]
    for b, prompt in enumerate(PROMPTS):
        ids = torch.tensor(prompt)
        feats = target.capture(ids[None]).features[0]
        per_row[b].extend(ids, feats)
        batched.prefill(b, ids, feats)
    gen = torch.Generator().manual_seed(0)
    anchors = torch.randint(3, target.vocab_size, (len(PROMPTS),), generator=gen)
    for round_ in range(rounds):
        got = batched.propose(anchors, steps, 0.0, needed=40)
        assert got.probs is None and got.tokens.shape == (len(PROMPTS), steps)
        for b, drafter in enumerate(per_row):
            want = drafter.propose(int(anchors[b]), steps, 0.0).tokens
            assert got.tokens[b].tolist() == want.tolist(), f"round {round_}, row {b}"
        # commit anchor + a different number of tokens per row, with random features
        width = steps + 1
        tokens = torch.cat([anchors[:, None], torch.randint(3, target.vocab_size, (len(PROMPTS), steps))], 1)
        feats = torch.randn(len(PROMPTS), width, draft.fc.in_features, generator=gen)
        counts = torch.tensor([width, 1, 0, 3])
        batched.extend(tokens, feats, counts)
        for b, drafter in enumerate(per_row):
            c = int(counts[b])
            drafter.extend(tokens[b, :c], feats[b, :c])
        anchors = torch.randint(3, target.vocab_size, (len(PROMPTS),), generator=gen)
    return per_row


# more prompts than rows, of different lengths, for the refilled batches
REFILL_PROMPTS = [*PROMPTS, [2, 3], [9, 8, 7, 6, 5], [1, 40, 41, 42, 43, 44], [7], [5, 5, 5]]


def check_refill_equals_alone(engine, rows: int = 3, plain: bool = False, prompts=REFILL_PROMPTS) -> list:
    """Decode ``prompts`` in ``rows`` refilled rows and assert that every prompt's result (tokens, finish
    reason, per-round counters and records) equals its single-prompt result with the same seeded
    generator, that every row after the first ``rows`` prompts was refilled, and (at T = 0) that the
    refilled batch takes fewer target steps than fixed chunks of ``rows`` prompts. Returns the results."""
    import time

    from deepspec.eval.engine import prompt_generator

    def gens():
        return [prompt_generator(0, "refill", i) for i in range(len(prompts))]

    one = engine.generate_plain if plain else engine.generate
    batch = engine.generate_plain_batch if plain else engine.generate_batch
    alone = [one(p, g) for p, g in zip(prompts, gens(), strict=True)]
    t0 = time.perf_counter()
    got = batch(prompts, gens(), rows=rows)
    wall = time.perf_counter() - t0
    counts = engine.last_batch
    for i, (g, a) in enumerate(zip(got, alone, strict=True)):
        assert (g.tokens, g.finish_reason) == (a.tokens, a.finish_reason), f"prompt {i}"
        gs, as_ = g.stats, a.stats
        assert (gs.rounds, gs.accepted, gs.proposed, gs.new_tokens, gs.accepted_at) == (
            as_.rounds,
            as_.accepted,
            as_.proposed,
            as_.new_tokens,
            as_.accepted_at,
        ), f"prompt {i}"
        assert [(r.proposed, r.accepted) for r in g.rounds] == [(r.proposed, r.accepted) for r in a.rounds]
    assert len({len(r.tokens) for r in got}) > 1  # answers of different lengths
    assert counts.refills == len(prompts) - rows
    decode = sum(r.stats.decode_seconds for r in got)
    assert 0 < decode <= wall  # the decode wall time, shared among the prompts
    if engine.config.temperature == 0:
        chunked = 0
        for start in range(0, len(prompts), rows):
            batch(prompts[start : start + rows], gens()[start : start + rows])
            chunked += engine.last_batch.steps
        assert counts.steps < chunked, (counts.steps, chunked)
        assert counts.steps >= max(r.stats.rounds for r in got)
    return got


def check_refilled_draft(target, draft, temperature: float) -> None:
    """:func:`check_refill_equals_alone` for the engine on the batched counterpart of ``draft``: at T = 0
    on a target and draft that agree (stop token 47 ends some answers early), at T > 0 with stop tokens
    every 9 ids."""
    from deepspec.eval.engine import EngineConfig, SpeculativeEngine

    greedy = temperature == 0
    stops = (47,) if greedy else tuple(range(0, target.vocab_size, 9))
    cfg = EngineConfig(
        num_proposals=4 if greedy else 3,
        temperature=temperature,
        max_new_tokens=20 if greedy else 12,
        stop_token_ids=stops,
    )
    engine = SpeculativeEngine(target, draft.as_drafter(target), cfg)
    got = check_refill_equals_alone(engine, rows=3)
    assert engine._batched is not None  # the batched drafter ran
    if greedy:
        assert sum(r.stats.accepted for r in got) > 0  # some proposals were accepted


def check_sampled_rows_independent(target, draft, batched_type: type) -> None:
    """T = 1 in the engine with the batched drafter (of ``batched_type``): every prompt's tokens in a batch
    equal its single-prompt tokens, given the same per-prompt generators."""
    from deepspec.eval.engine import EngineConfig, SpeculativeEngine, prompt_generator

    cfg = EngineConfig(num_proposals=3, temperature=1.0, max_new_tokens=12)
    engine = SpeculativeEngine(target, draft.as_drafter(target), cfg)

    def gens():
        return [prompt_generator(0, "rows", i) for i in range(len(PROMPTS))]

    single = [engine.generate(p, g).tokens for p, g in zip(PROMPTS, gens(), strict=True)]
    assert isinstance(engine._batched[1], batched_type)
    assert [r.tokens for r in engine.generate_batch(PROMPTS, gens())] == single
