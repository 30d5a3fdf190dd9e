"""Hardware-aware prefix scheduler for DSpark proposals (beyond the reference implementation).

DSpark's confidence head predicts, for every slot ``k``, the probability ``c_k`` that slot ``k`` is
accepted given slots ``< k`` were. The prefix-survival probability is ``s_k = prod_{j<=k} c_j`` and a
round that verifies the first ``g`` slots commits ``E[g] = 1 + sum_{k<=g} s_k`` tokens in expectation.
Verifying more tokens costs more target time, and how much more depends on the hardware (flat while
the GPU is memory-bound, then growing). Given a profiled cost curve ``t(n)`` (seconds of one
verification forward over ``n`` tokens, i.e. the inverse of a steps-per-second curve), the scheduler
admits slots greedily in order of decreasing survival (which is slot order, since ``s`` never grows)
and stops at the first slot that lowers the expected committed tokens per second
``E[g] / (t_draft + t(g + 1))``.

Truncating a proposal uses only the draft's own information, never the target's, so the output
distribution is unchanged (losslessness holds for any truncation rule of this kind).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from deepspec.eval.kv_cache import crop_cache

if TYPE_CHECKING:
    from deepspec.target_model.model import TargetModel


@dataclass
class CostCurve:
    """Seconds of one verification forward as a function of the tokens verified.

    ``seconds[n - 1]`` is the time to verify ``n`` tokens (anchor + ``n - 1`` drafts); lengths past the
    end are extrapolated linearly from the last two points. ``draft_seconds`` is the (sunk) cost of
    producing a proposal, included so that the rate is per whole round.
    """

    seconds: list[float]
    draft_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not self.seconds or any(s <= 0 for s in self.seconds):
            raise ValueError("cost curve needs at least one positive time per verified-token count")

    def round_seconds(self, num_tokens: int) -> float:
        n = max(1, num_tokens)
        if n <= len(self.seconds):
            t = self.seconds[n - 1]
        else:
            last = self.seconds[-1]
            slope = self.seconds[-1] - self.seconds[-2] if len(self.seconds) > 1 else 0.0
            t = last + max(slope, 0.0) * (n - len(self.seconds))
        return self.draft_seconds + t

    @classmethod
    def from_steps_per_second(cls, steps_per_second: list[float], draft_seconds: float = 0.0) -> CostCurve:
        """Build from a profiled steps/s curve (``steps_per_second[n - 1]`` for ``n`` verified tokens)."""
        return cls([1.0 / s for s in steps_per_second], draft_seconds)

    def to_dict(self) -> dict:
        return {"seconds": list(self.seconds), "draft_seconds": self.draft_seconds}

    @classmethod
    def from_dict(cls, d: dict) -> CostCurve:
        return cls(list(d["seconds"]), float(d.get("draft_seconds", 0.0)))


@dataclass
class PrefixScheduler:
    """Chooses how many proposed slots to verify from the draft's per-slot confidences."""

    curve: CostCurve
    min_proposals: int = 0
    decisions: list[int] = field(default_factory=list, repr=False)

    def expected_rate(self, survival: list[float], g: int) -> float:
        """Expected committed tokens per second when verifying the first ``g`` slots."""
        return (1.0 + sum(survival[:g])) / self.curve.round_seconds(g + 1)

    def choose(self, confidence: torch.Tensor) -> int:
        """Number of leading slots to keep (0 .. len(confidence))."""
        conf = confidence.detach().float().clamp(0.0, 1.0).cpu()
        survival = torch.cumprod(conf, dim=0).tolist()
        best_g = min(self.min_proposals, len(survival))
        best = self.expected_rate(survival, best_g)
        for g in range(best_g + 1, len(survival) + 1):
            rate = self.expected_rate(survival, g)
            if rate <= best:
                break  # early stop: later slots survive even less and cost at least as much
            best, best_g = rate, g
        self.decisions.append(best_g)
        return best_g


@torch.no_grad()
def profile_cost_curve(
    target: TargetModel,
    max_tokens: int = 8,
    context_len: int = 256,
    repeats: int = 5,
    warmup: int = 2,
) -> CostCurve:
    """Measure one verification forward over ``n = 1..max_tokens`` tokens after a ``context_len`` prefix.

    The cache is cropped back to the prefix after every forward, exactly as in the engine.
    """
    device = target.lm_head.weight.device
    vocab = target.vocab_size
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (1, context_len), generator=gen).to(device)
    out = target.capture(prefix, use_cache=True)
    cache = out.past_key_values
    seconds: list[float] = []
    for n in range(1, max_tokens + 1):
        ids = torch.randint(0, vocab, (1, n), generator=gen).to(device)
        times = []
        for r in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            target.capture(ids, past_key_values=cache, use_cache=True)
            _sync(device)
            if r >= warmup:
                times.append(time.perf_counter() - t0)
            crop_cache(cache, context_len)
        times.sort()
        seconds.append(times[len(times) // 2])
    return CostCurve(seconds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
