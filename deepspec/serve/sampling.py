"""The sampling parameters of one request.

The engine (:mod:`deepspec.serve.engine`) applies them per row on the device with
:func:`deepspec.decode.sampling.filtered_probs` (temperature, top-k, top-p, min-p) and draws each
sampling row's token with the row's own ``torch.Generator`` seeded from ``seed``, so a seeded
request gives the same answer whatever else shares the batch. Stop strings and ``max_tokens`` are
checked per row after every token.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """The sampling parameters of one request (already validated)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0
