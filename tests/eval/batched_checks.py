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
