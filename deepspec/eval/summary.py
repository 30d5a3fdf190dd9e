"""The evaluation summary and the acceptance gate, shared by ``deepspec eval`` and the operator.

Light on purpose (pydantic only, no torch): the operator imports it to read the summary an evaluation
Job leaves in its termination log and to decide whether the new draft may serve.

**The gate rule** (one function, :func:`gate_decision`, used by both):

1. no accepted length (no evaluation result) -> fail;
2. ``gate.min_accept_length`` set and the macro accepted length below it -> fail;
3. ``gate.max_drop`` set and a baseline known and ``tau < baseline - max_drop`` -> fail;
4. otherwise pass. A ``max_drop`` without a baseline is not checked (the message says so).

The baseline is the accepted length to beat: the operator passes the serving draft's (or the
resource's ``baselineAcceptLength``), ``deepspec eval`` passes ``--baseline-accept-length`` when given.
Before this module the CLI checked rule 2 only and the operator rules 1-3; the CLI now applies the
same rules (it simply has no baseline unless told one).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from deepspec.config import GateConfig

SUMMARY_VERSION = 1
SUMMARY_LIMIT = 4096  # bytes of a Kubernetes termination message


class BenchmarkSummary(BaseModel):
    """One benchmark's figures in the compact summary."""

    tau: float = Field(..., description="Accepted length: tokens committed per verification round.")
    acceptance_ratio: float | None = Field(None, description="Accepted draft tokens / proposed.")
    n: int | None = Field(None, description="Prompts evaluated.")


class EvalSummary(BaseModel):
    """The compact evaluation summary (``summary.json`` and the termination log, < 4 KiB)."""

    v: int = SUMMARY_VERSION
    algorithm: str | None = None
    target_revision: str | None = None
    checkpoint: str | None = None
    macro_accept_length: float
    benchmarks: dict[str, BenchmarkSummary] = Field(default_factory=dict)

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> EvalSummary:
        """The summary of a full ``report.json`` document (figures rounded to 4 decimals)."""
        return cls(
            algorithm=report["algorithm"],
            target_revision=report.get("target_revision"),
            checkpoint=report.get("checkpoint"),
            macro_accept_length=round(report["macro"]["tau"], 4),
            benchmarks={
                name: BenchmarkSummary(
                    tau=round(b["tau"], 4), acceptance_ratio=round(b["acceptance_ratio"], 4), n=b["prompts"]
                )
                for name, b in report["benchmarks"].items()
            },
        )

    @classmethod
    def parse(cls, text: str) -> EvalSummary:
        """Read a summary document (``summary.json``, a termination message)."""
        return cls.model_validate(json.loads(text))

    def to_json(self) -> str:
        """Compact JSON; an error when over the termination-log limit (it would be cut, then unreadable)."""
        text = json.dumps(self.model_dump(), separators=(",", ":"))
        size = len(text.encode())
        if size >= SUMMARY_LIMIT:
            raise ValueError(
                f"compact summary is {size} bytes, over the {SUMMARY_LIMIT}-byte termination-log limit "
                "(too many benchmarks or a very long checkpoint path)"
            )
        return text


class GateDecision(BaseModel):
    """Whether a draft passed the acceptance gate, and why (one line, for Events and conditions)."""

    passed: bool
    reason: str


def gate_decision(
    summary: EvalSummary | float | None, gate: GateConfig, baseline: float | None = None
) -> GateDecision:
    """Apply the acceptance gate (rules in the module docstring) to a summary or a macro accepted length."""
    tau = summary.macro_accept_length if isinstance(summary, EvalSummary) else summary
    if tau is None:
        return GateDecision(passed=False, reason="no evaluation result")
    if gate.min_accept_length is not None and tau < gate.min_accept_length:
        return GateDecision(
            passed=False, reason=f"accepted length {tau:.3f} < min_accept_length {gate.min_accept_length}"
        )
    if gate.max_drop is not None and baseline is not None and tau < baseline - gate.max_drop:
        return GateDecision(
            passed=False,
            reason=f"accepted length {tau:.3f} dropped more than {gate.max_drop} below baseline {baseline:.3f}",
        )
    reason = f"accepted length {tau:.3f}" + (f" (baseline {baseline:.3f})" if baseline is not None else "")
    if gate.max_drop is not None and baseline is None:
        reason += "; max_drop not checked: no baseline"
    return GateDecision(passed=True, reason=reason)
