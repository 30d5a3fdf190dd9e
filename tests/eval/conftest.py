"""Shared fixtures and test drafters for the evaluation tests."""

from __future__ import annotations

import pytest
import torch

from deepspec.models.base import Proposal


class TargetCopyDrafter:
    """Proposes the target's own greedy continuation (full recompute, no cache), corrupting some slots.

    Slot ``k`` of a round is replaced by a wrong token when ``(len(context) + k) % corrupt_every == 0``,
    so rounds accept 0..g tokens at varying positions: every cache-crop length is exercised.
    """

    def __init__(self, model, corrupt_every: int = 3) -> None:
        self.model = model
        self.vocab = model.config.vocab_size
        self.corrupt_every = corrupt_every
        self.context: list[int] = []

    def reset(self) -> None:
        self.context = []

    def extend(self, tokens, features) -> None:
        assert features.shape[0] == tokens.numel()
        self.context.extend(tokens.tolist())

    @torch.no_grad()
    def propose(self, anchor, num_proposals, temperature, generator=None) -> Proposal:
        seq = [*self.context, anchor]
        out = []
        for k in range(num_proposals):
            logits = self.model(torch.tensor([seq])).logits[0, -1]
            tok = int(torch.argmax(logits))
            if (len(self.context) + k) % self.corrupt_every == 0:
                tok = (tok + 1) % self.vocab
            out.append(tok)
            seq.append(tok)
        probs = torch.zeros(len(out), self.vocab)
        probs[torch.arange(len(out)), torch.tensor(out)] = 1.0
        return Proposal(torch.tensor(out), probs)


@torch.no_grad()
def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Target greedy decode by full recomputation (independent of the engine's cache handling)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(torch.argmax(model(torch.tensor([seq])).logits[0, -1])))
    return seq[len(prompt) :]


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models are dominated by thread overhead; one intra-op thread is faster and steadier on CI."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama_target():
    from deepspec.testing.tiny import tiny_target

    return tiny_target("llama")
