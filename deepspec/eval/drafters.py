"""Model-free drafters implementing :class:`deepspec.models.base.SpeculativeDrafter`.

* :class:`NGramDrafter` (prompt lookup): proposes the continuation of the most recent earlier
  occurrence of the current suffix. Needs no training, so it is a useful floor for the accepted
  length and an engine check on real prompts (code and math answers repeat their prompt a lot).
* :class:`RandomDrafter`: proposes from a fixed random bigram table (optionally with random
  confidences). It is wrong most of the time, which makes it the adversarial drafter for the
  losslessness tests: every rejection path of the sampler is exercised.
"""

from __future__ import annotations

import torch

from deepspec.models.base import Proposal


def _one_hot(tokens: list[int], vocab: int) -> torch.Tensor:
    probs = torch.zeros(len(tokens), vocab)
    if tokens:
        probs[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
    return probs


class NGramDrafter:
    """Prompt-lookup drafting over the committed context (deterministic; one-hot draft probabilities)."""

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.vocab_size = vocab_size
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.context: list[int] = []

    def reset(self) -> None:
        self.context = []

    def extend(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        self.context.extend(int(t) for t in tokens.reshape(-1).tolist())

    def propose(
        self, anchor: int, num_proposals: int, temperature: float, generator: torch.Generator | None = None
    ) -> Proposal:
        seq = [*self.context, anchor]
        out: list[int] = []
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            suffix = seq[-n:]
            for start in range(len(seq) - n - 1, -1, -1):  # most recent earlier match first
                if seq[start : start + n] == suffix:
                    out = seq[start + n : start + n + num_proposals]
                    break
            if out:
                break
        return Proposal(torch.tensor(out, dtype=torch.long), _one_hot(out, self.vocab_size))


class RandomDrafter:
    """Proposes from a fixed random bigram distribution q(x_k | x_{k-1}) (seeded, context-free otherwise).

    ``sharpness`` scales the random logits (higher = more peaked q). With ``confidence=True`` the
    proposal carries pseudo-random per-slot confidences in (0, 1), enough to drive the confidence
    threshold and the prefix scheduler in tests.
    """

    def __init__(
        self, vocab_size: int, seed: int = 0, sharpness: float = 2.0, confidence: bool = False
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.softmax(torch.randn(vocab_size, vocab_size, generator=gen) * sharpness, dim=-1)
        self.conf_logits = torch.randn(vocab_size, generator=gen)
        self.vocab_size = vocab_size
        self.with_confidence = confidence

    def reset(self) -> None:
        pass

    def extend(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        pass

    def propose(
        self, anchor: int, num_proposals: int, temperature: float, generator: torch.Generator | None = None
    ) -> Proposal:
        prev = anchor
        tokens, probs, conf = [], [], []
        for _ in range(num_proposals):
            q = self.table[prev]
            if temperature > 0:
                q = torch.softmax(torch.log(q) / temperature, dim=-1)
                gen_device = generator.device if generator is not None else torch.device("cpu")
                tok = int(torch.multinomial(q.to(gen_device), 1, generator=generator))
            else:
                tok = int(torch.argmax(q))
            tokens.append(tok)
            probs.append(q)
            conf.append(float(torch.sigmoid(self.conf_logits[tok] + 1.0)))
            prev = tok
        return Proposal(
            torch.tensor(tokens, dtype=torch.long),
            torch.stack(probs) if probs else torch.zeros(0, self.vocab_size),
            torch.tensor(conf) if self.with_confidence else None,
        )
