"""The contract between draft models and the speculative-decoding engine.

Training uses each draft's ``forward``/loss (algorithm-specific, see the model files). Inference uses
the small, algorithm-independent protocol below, so the engine in ``deepspec.eval`` drives Eagle3,
DFlash and DSpark the same way:

* the engine runs the frozen target over committed tokens and captures, for each position ``t``, the
  concatenated outputs of the draft's target layers (``features[t]``, width ``k * H``);
* after each verification round the engine calls :meth:`SpeculativeDrafter.extend` with the newly
  committed tokens *whose target features are known* and those features;
* then :meth:`SpeculativeDrafter.propose` with the *anchor*: the last committed token (the bonus /
  corrected token of the previous round), whose features are not known yet. The drafter proposes the
  tokens that follow the anchor.

Example of one round: committed ``x_0..x_t`` with features for ``x_0..x_{t-1}``; the anchor is ``x_t``.
The drafter proposes ``d_1..d_g`` (predictions of ``x_{t+1}..x_{t+g}``). The target verifies
``[x_t, d_1..d_g]``, which yields features for ``x_t, d_1..d_a`` (the accepted ones) and a bonus /
corrected token ``b``. The engine calls ``extend([x_t, d_1..d_a], their features)`` and then
``propose(anchor=b, ...)``.

All probability tensors are over the *target* vocabulary (a reduced draft vocabulary is mapped back
with ``d2t``; tokens outside it get probability 0), so rejection sampling is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F


@dataclass
class Proposal:
    """Draft tokens for one round.

    tokens:     [g] proposed token ids (target vocabulary), g <= num_proposals.
    probs:      [g, V] the draft distribution each token was sampled from (after temperature; one-hot
                rows are fine for greedy), over the target vocabulary V.
    confidence: [g] predicted probability that slot k is accepted given slots < k were (DSpark's
                confidence head), or None.
    """

    tokens: torch.Tensor
    probs: torch.Tensor
    confidence: torch.Tensor | None = None


@runtime_checkable
class SpeculativeDrafter(Protocol):
    """What the engine needs from a draft model at inference time (batch size 1)."""

    def reset(self) -> None:
        """Forget all state: a new sequence starts."""

    def extend(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        """Append committed tokens [n] and their target features [n, k*H] to the draft's context."""

    def propose(
        self,
        anchor: int,
        num_proposals: int,
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> Proposal:
        """Propose up to ``num_proposals`` tokens following ``anchor``.

        Must not change the committed context: speculative state (e.g. draft KV entries written
        while unrolling) is discarded or overwritten by the next :meth:`extend`.
        At ``temperature == 0`` proposals are the argmax; otherwise tokens are sampled with
        ``generator`` (seeded per prompt by the engine).
        """


def sample_from_logits(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V] -> (tokens [n], probs [n, V] fp32). T = 0: argmax with one-hot rows."""
    logits = logits.float()
    if temperature <= 0:
        tokens = logits.argmax(-1)
        probs = F.one_hot(tokens, logits.shape[-1]).float()
        return tokens, probs
    probs = torch.softmax(logits / temperature, dim=-1)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, probs
