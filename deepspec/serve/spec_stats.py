"""Per-request speculative statistics and the response fields SGLang and vLLM put them in.

A request's statistics are counts over its verification steps (one target forward that checks
the proposed draft tokens and adds one token of its own):

* ``verify_steps``: verification steps;
* ``accepted`` / ``proposed``: draft tokens accepted / proposed over those steps;
* ``histogram[j]``: steps that accepted exactly ``j`` draft tokens (``j = 0..num_proposals``).

Accepted length = 1 + accepted / verify_steps (the target's own token of each step included), the
definition of both engines and of ``deepspec eval`` (``AcceptanceStats.tau``).

Response shapes, as the engines build them (and as :mod:`deepspec.monitor.canary` reads them):

* SGLang: ``sglext.spec_tokens_details`` when the request sets ``return_spec_tokens_details``
  (``process_spec_tokens_details_from_ret`` and ``spec_tokens_details_from_meta_info`` in
  ``python/sglang/srt/entrypoints/openai/utils.py``, sgl-project/sglang PR #33518): ``spec_verify_ct``,
  ``spec_num_correct_drafts``, ``spec_num_proposed_drafts``, ``spec_accept_length``,
  ``spec_accept_rate`` and ``spec_correct_drafts_histogram``.
* vLLM: a top-level ``metrics.speculative_decoding`` object when the server runs with
  ``--per-request-spec-decode-metrics summary`` (``ObservabilityConfig.per_request_spec_decode_metrics``,
  ``vllm/config/observability.py``; the fields and their relations are those checked by vLLM's
  ``test_per_request_spec_decode_metrics``: ``num_spec_steps == sum(acceptance_histogram)``,
  ``num_accepted_draft_tokens == sum(j * histogram[j])``, ``mean_acceptance_length == 1 +
  accepted / steps``, ``draft_acceptance_rate == accepted / num_draft_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SpecStats:
    """The speculative counts of one request (or of several, summed with ``+``)."""

    verify_steps: int = 0
    accepted: int = 0
    proposed: int = 0
    histogram: list[int] = field(default_factory=list)

    @property
    def accept_length(self) -> float:
        """1 + accepted / steps; 0.0 without a verification step (SGLang's convention)."""
        return 1.0 + self.accepted / self.verify_steps if self.verify_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def accepted_at(self) -> list[int]:
        """Steps that accepted the draft token at each position (0-based): ``sum(histogram[i + 1:])``."""
        return [sum(self.histogram[i + 1 :]) for i in range(max(len(self.histogram) - 1, 0))]

    def __add__(self, other: SpecStats) -> SpecStats:
        n = max(len(self.histogram), len(other.histogram))
        hist = [
            (self.histogram[i] if i < len(self.histogram) else 0)
            + (other.histogram[i] if i < len(other.histogram) else 0)
            for i in range(n)
        ]
        return SpecStats(
            self.verify_steps + other.verify_steps,
            self.accepted + other.accepted,
            self.proposed + other.proposed,
            hist,
        )

    def sglang_details(self) -> dict[str, Any]:
        """SGLang's ``sglext.spec_tokens_details``."""
        return {
            "spec_verify_ct": self.verify_steps,
            "spec_num_correct_drafts": self.accepted,
            "spec_num_proposed_drafts": self.proposed,
            "spec_accept_length": self.accept_length,
            "spec_accept_rate": self.acceptance_rate,
            "spec_correct_drafts_histogram": list(self.histogram),
        }

    def vllm_summary(self) -> dict[str, Any]:
        """vLLM's ``metrics.speculative_decoding`` (the ``summary`` level)."""
        return {
            "num_spec_steps": self.verify_steps,
            "num_draft_tokens": self.proposed,
            "num_accepted_draft_tokens": self.accepted,
            "acceptance_histogram": list(self.histogram),
            "mean_acceptance_length": self.accept_length,
            "draft_acceptance_rate": self.acceptance_rate,
        }


def response_fields(stats: SpecStats | None, sglang_details: bool) -> dict[str, Any]:
    """Top-level response fields for one request: vLLM's always, SGLang's when the request asked."""
    if stats is None:
        return {}
    out: dict[str, Any] = {"metrics": {"speculative_decoding": stats.vllm_summary()}}
    if sglang_details:
        out["sglext"] = {"spec_tokens_details": stats.sglang_details()}
    return out
