"""Retraining and promotion decisions for a monitored draft (pure; for the operator's reconcile).

* :func:`should_retrain`: whether a ``retrain`` policy asks for a new run now.
  ``manual`` never; ``onTargetUpdate`` when the requested target revision differs from the one
  the serving draft was trained on; ``onDrift`` on that too, and when the live monitor reports
  drift (a target changed behind an unchanged revision, or the traffic moved). Never while a run
  is in progress, and never on ``missing`` / ``broken`` / ``no_speculation`` states: those need a
  person, not a new draft.
* :func:`promotion_decision`: promote a new draft only if it beats the serving draft **measured on
  the new target** (both evaluated on the same benchmarks after the target update).

Each returns a reason sentence, meant for the Kubernetes Event of the decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from deepspec.monitor.drift import DriftState, DriftStatus

RetrainPolicy = Literal["manual", "onTargetUpdate", "onDrift"]
POLICIES: tuple[str, ...] = ("manual", "onTargetUpdate", "onDrift")


@dataclass(frozen=True)
class Decision:
    act: bool
    reason: str


def should_retrain(
    policy: RetrainPolicy,
    *,
    target_revision: str,
    serving_target_revision: str | None,
    drift: DriftStatus | None = None,
    run_in_progress: bool = False,
) -> Decision:
    if policy not in POLICIES:
        raise ValueError(f"retrain policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    if run_in_progress:
        return Decision(False, "a training run is already in progress")
    revision_changed = serving_target_revision is not None and serving_target_revision != target_revision
    if policy == "manual":
        why = "target revision changed" if revision_changed else "no request"
        return Decision(False, f"retrain policy is manual ({why}); start a run by changing the spec")
    if revision_changed:
        return Decision(
            True, f"target revision changed from {serving_target_revision!r} to {target_revision!r}"
        )
    if policy == "onDrift" and drift is not None:
        if drift.drift:
            return Decision(True, f"live drift: {drift.reason}")
        if drift.state in (DriftState.BROKEN, DriftState.MISSING, DriftState.NO_SPECULATION):
            return Decision(
                False, f"live state {drift.state.value} needs attention, not a new draft: {drift.reason}"
            )
    return Decision(False, "serving draft is current")


def promotion_decision(
    candidate_accept_length: float,
    serving_accept_length: float | None,
    *,
    min_gain: float = 0.0,
    gate: float | None = None,
) -> Decision:
    """Both accepted lengths measured on the *new* target; ``serving_accept_length`` None when
    nothing serves yet. ``min_gain``: how much better (absolute) the candidate must be."""
    for name, v in (("candidate", candidate_accept_length), ("serving", serving_accept_length)):
        if v is not None and not (math.isfinite(v) and v >= 1.0):
            raise ValueError(f"{name} accepted length must be a number >= 1.0, got {v!r}")
    if gate is not None and candidate_accept_length < gate:
        return Decision(
            False,
            f"new draft {candidate_accept_length:.3f} is below the acceptance gate {gate:.3f}; keeping the serving one",
        )
    if serving_accept_length is None:
        return Decision(True, f"no draft serving; new draft {candidate_accept_length:.3f} passes the gate")
    if candidate_accept_length > serving_accept_length + min_gain:
        return Decision(
            True,
            f"new draft {candidate_accept_length:.3f} beats the serving draft {serving_accept_length:.3f} on the new target",
        )
    return Decision(
        False,
        f"new draft {candidate_accept_length:.3f} does not beat the serving draft {serving_accept_length:.3f} "
        f"(+{min_gain:g} required) on the new target; keeping the serving one",
    )
