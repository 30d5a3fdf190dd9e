"""Acceptance metrics of speculative decoding.

One *verification round* proposes ``g`` draft tokens, the target accepts the first ``a`` of them
(``0 <= a <= g``) and commits one more token of its own (the bonus token when ``a == g``, the
corrected token otherwise). So a round commits ``a + 1`` tokens:

* accepted length ``tau`` = mean of ``a + 1`` over rounds (bonus / corrected token included);
* conditional acceptance at position ``k`` (1-based) = P(slot k accepted | slots 1..k-1 accepted and
  slot k was proposed) = #rounds with ``a >= k`` / #rounds with ``a >= k-1`` and ``g >= k``;
* cumulative survival at ``k`` = P(slots 1..k all accepted) over rounds that proposed at least ``k``
  tokens (with a fixed proposal length this is the product of the conditional acceptances);
* mean proposal length = mean of ``g``; acceptance ratio = mean ``a`` / mean ``g``.

Statistics are plain counters so they merge exactly across prompts, benchmarks and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class AcceptanceStats:
    """Counters over verification rounds; merge with ``+=``.

    ``reached[k]`` counts rounds where slots ``1..k`` were all accepted *and* slot ``k+1`` was proposed
    (the denominator of the conditional acceptance at position ``k+1``); ``accepted_at[k]`` counts rounds
    where slot ``k+1`` was accepted; ``proposed_at[k]`` counts rounds that proposed slot ``k+1``.
    """

    rounds: int = 0
    committed: int = 0  # sum of (a + 1)
    accepted: int = 0  # sum of a
    proposed: int = 0  # sum of g
    reached: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    proposed_at: list[int] = field(default_factory=list)
    # wall-clock accounting (seconds and tokens of the decode phase, prefill excluded)
    decode_seconds: float = 0.0
    new_tokens: int = 0
    prompts: int = 0

    def _grow(self, n: int) -> None:
        for lst in (self.reached, self.accepted_at, self.proposed_at):
            lst.extend([0] * (n - len(lst)))

    def add_round(self, proposed: int, accepted: int) -> None:
        """Record one round that proposed ``proposed`` tokens and accepted the first ``accepted``."""
        if not 0 <= accepted <= proposed:
            raise ValueError(f"accepted={accepted} must lie in [0, proposed={proposed}]")
        self._grow(proposed)
        self.rounds += 1
        self.committed += accepted + 1
        self.accepted += accepted
        self.proposed += proposed
        for k in range(proposed):  # slot k+1
            self.proposed_at[k] += 1
            if k <= accepted:  # slots 1..k accepted, so slot k+1 was "reached"
                self.reached[k] += 1
            if k < accepted:
                self.accepted_at[k] += 1

    def __iadd__(self, other: AcceptanceStats) -> AcceptanceStats:
        self._grow(len(other.reached))
        for k in range(len(other.reached)):
            self.reached[k] += other.reached[k]
            self.accepted_at[k] += other.accepted_at[k]
            self.proposed_at[k] += other.proposed_at[k]
        self.rounds += other.rounds
        self.committed += other.committed
        self.accepted += other.accepted
        self.proposed += other.proposed
        self.decode_seconds += other.decode_seconds
        self.new_tokens += other.new_tokens
        self.prompts += other.prompts
        return self

    # ------------------------------------------------------------------ derived figures
    @property
    def tau(self) -> float:
        """Mean tokens committed per verification round, bonus / corrected token included."""
        return self.committed / self.rounds if self.rounds else 0.0

    @property
    def mean_proposal_length(self) -> float:
        return self.proposed / self.rounds if self.rounds else 0.0

    @property
    def mean_accepted(self) -> float:
        return self.accepted / self.rounds if self.rounds else 0.0

    @property
    def acceptance_ratio(self) -> float:
        """Mean accepted draft tokens per round / mean proposal length."""
        return self.accepted / self.proposed if self.proposed else 0.0

    def conditional_acceptance(self) -> list[float]:
        """P(slot k accepted | slots < k accepted), k = 1..max proposal length."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted_at, self.reached, strict=True)]

    def cumulative_acceptance(self) -> list[float]:
        """P(slots 1..k all accepted) among rounds that proposed at least k tokens."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted_at, self.proposed_at, strict=True)]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def verify_rate(self) -> float:
        """Verification rounds (target forwards) per second of decode."""
        return self.rounds / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "rounds": self.rounds,
            "tau": self.tau,
            "acceptance_ratio": self.acceptance_ratio,
            "mean_proposal_length": self.mean_proposal_length,
            "mean_accepted": self.mean_accepted,
            "conditional_acceptance": self.conditional_acceptance(),
            "cumulative_acceptance": self.cumulative_acceptance(),
            "new_tokens": self.new_tokens,
            "decode_seconds": self.decode_seconds,
            "tokens_per_second": self.tokens_per_second,
            "verify_rate": self.verify_rate,
        }

    def to_dict(self) -> dict[str, Any]:
        """Raw counters (exact merge across ranks)."""
        return {
            "rounds": self.rounds,
            "committed": self.committed,
            "accepted": self.accepted,
            "proposed": self.proposed,
            "reached": list(self.reached),
            "accepted_at": list(self.accepted_at),
            "proposed_at": list(self.proposed_at),
            "decode_seconds": self.decode_seconds,
            "new_tokens": self.new_tokens,
            "prompts": self.prompts,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AcceptanceStats:
        return cls(**{k: (list(v) if isinstance(v, list) else v) for k, v in d.items()})


def macro_average(values: list[float]) -> float:
    """Unweighted mean over benchmarks (the reference table's macro average)."""
    return sum(values) / len(values) if values else 0.0
