"""Speculative-decoding counts over a sliding time window.

Every source (vLLM counters, SGLang gauges or counters, per-request canary statistics) is turned
into :class:`AcceptanceSample` increments: how many verification steps happened and how many draft
tokens they accepted since the previous measurement. A window sums the increments of the last
``window_s`` seconds, so the live accepted length is a ratio of sums (heavy traffic weighs more),
never an average of averages.

Conventions (the engines' own): the accepted length counts the bonus token the target adds at each
verification step, ``1 + accepted / steps`` (vLLM ``vllm/v1/spec_decode/metrics.py``: "mean
acceptance length ... includes the bonus token"; SGLang ``spec_accept_length`` =
``completion_tokens / spec_verify_ct``); the acceptance ratio is accepted / proposed draft tokens;
per-position acceptance is the share of steps that accepted the draft token at that position.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class AcceptanceSample:
    """Counts of one measurement interval."""

    verify_steps: float  # verification steps (vLLM num_drafts, SGLang spec_verify_ct)
    accepted_tokens: float  # draft tokens accepted, bonus token excluded
    draft_tokens: float | None = None  # draft tokens proposed, when the source knows
    accepted_per_position: tuple[float, ...] | None = None  # steps that accepted position i
    # SGLang gauge modes only report the engine's own acceptance ratio: (ratio * weight, weight)
    reported_ratio: tuple[float, float] | None = None

    def __add__(self, other: AcceptanceSample) -> AcceptanceSample:
        return AcceptanceSample(
            self.verify_steps + other.verify_steps,
            self.accepted_tokens + other.accepted_tokens,
            _add_opt(self.draft_tokens, other.draft_tokens),
            _add_positions(self.accepted_per_position, other.accepted_per_position),
            _add_pair(self.reported_ratio, other.reported_ratio),
        )

    @property
    def empty(self) -> bool:
        return self.verify_steps <= 0


ZERO = AcceptanceSample(0.0, 0.0)


def _add_opt(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _add_pair(a: tuple[float, float] | None, b: tuple[float, float] | None) -> tuple[float, float] | None:
    if a is None:
        return b
    if b is None:
        return a
    return (a[0] + b[0], a[1] + b[1])


def _add_positions(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> tuple[float, ...] | None:
    if a is None:
        return b
    if b is None:
        return a
    n = max(len(a), len(b))
    return tuple((a[i] if i < len(a) else 0.0) + (b[i] if i < len(b) else 0.0) for i in range(n))


@dataclass(frozen=True)
class WindowStats:
    """What the window holds now."""

    verify_steps: float
    accept_length: float | None
    acceptance_ratio: float | None
    position_acceptance: tuple[float, ...]
    samples: int
    last_sample_at: float | None


def summarize(total: AcceptanceSample) -> tuple[float | None, float | None, tuple[float, ...]]:
    """Accepted length, acceptance ratio and per-position acceptance of summed counts."""
    if total.empty:
        return None, None, ()
    accept_length = 1.0 + total.accepted_tokens / total.verify_steps
    if total.draft_tokens:
        ratio: float | None = total.accepted_tokens / total.draft_tokens
    elif total.reported_ratio and total.reported_ratio[1] > 0:
        ratio = total.reported_ratio[0] / total.reported_ratio[1]
    else:
        ratio = None
    positions = tuple(c / total.verify_steps for c in (total.accepted_per_position or ()))
    return accept_length, ratio, positions


class SlidingWindow:
    """Samples of the last ``window_s`` seconds; time is passed in by the caller."""

    def __init__(self, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError(f"window must be > 0 s, got {window_s}")
        self.window_s = window_s
        self._items: deque[tuple[float, AcceptanceSample]] = deque()

    def add(self, t: float, sample: AcceptanceSample) -> None:
        if not sample.empty:
            self._items.append((t, sample))

    def _expire(self, now: float) -> None:
        while self._items and self._items[0][0] <= now - self.window_s:
            self._items.popleft()

    def stats(self, now: float) -> WindowStats:
        self._expire(now)
        total = ZERO
        for _, s in self._items:
            total = total + s
        accept_length, ratio, positions = summarize(total)
        return WindowStats(
            verify_steps=total.verify_steps,
            accept_length=accept_length,
            acceptance_ratio=ratio,
            position_acceptance=positions,
            samples=len(self._items),
            last_sample_at=self._items[-1][0] if self._items else None,
        )
