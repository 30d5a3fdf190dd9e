"""Drift decision for a deployed target + draft pair: pure functions, time passed in.

Shared by ``deepspec monitor`` and the operator. The caller measures a windowed live accepted
length (an :class:`Observation`), keeps the last :class:`DriftStatus` (the operator can store
:meth:`DriftStatus.to_dict` in ``status.drift`` and rebuild it with :meth:`DriftStatus.from_dict`)
and calls :func:`evaluate_drift` at each measurement. Nothing here sleeps or reads the clock.

States, in the order they are decided:

* ``missing``: the last measurement got no metrics (server unreachable, metrics absent). Its own
  alert, never drift.
* ``no_speculation``: the server answers but does not speculate (SGLang exports
  ``sglang:spec_accept_length`` 0, vLLM has no ``vllm:spec_decode_*`` series).
* ``insufficient_data``: fewer verification steps in the window than ``min_verify_steps`` (low
  traffic): no decision either way.
* ``broken``: the accepted length is near 1.0 (every draft token rejected): a draft that failed to
  load or a wrong vocabulary mapping, not a drift to retrain for.
* ``no_baseline``: measured, but there is nothing to compare with.
* ``below_baseline``: below ``baseline * (1 - tolerance)`` for less than ``duration_s``.
* ``drift``: below for at least ``duration_s`` (gaps without data shorter than ``duration_s``
  do not restart the clock; longer ones do).
* ``ok``: at or above the threshold.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any


class DriftState(str, Enum):
    OK = "ok"
    BELOW_BASELINE = "below_baseline"
    DRIFT = "drift"
    INSUFFICIENT_DATA = "insufficient_data"
    MISSING = "missing"
    NO_SPECULATION = "no_speculation"
    BROKEN = "broken"
    NO_BASELINE = "no_baseline"


@dataclass(frozen=True)
class DriftPolicy:
    """How the decision is made. Durations are in seconds."""

    tolerance: float = 0.1  # relative drop below the baseline that counts
    duration_s: float = 900.0  # how long the drop must last before it is drift
    min_verify_steps: float = 200.0  # verification steps needed in the window for any decision
    broken_below: float = 1.1  # accepted length at or below this is "broken", not drift

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.tolerance < 1.0:
            problems.append(f"tolerance must be in (0, 1), got {self.tolerance}")
        if self.duration_s < 0:
            problems.append(f"duration must be >= 0 s, got {self.duration_s}")
        if self.min_verify_steps < 1:
            problems.append(f"min_verify_steps must be >= 1, got {self.min_verify_steps}")
        if self.broken_below < 1.0:
            problems.append(f"broken_below is an accepted length (>= 1.0), got {self.broken_below}")
        if problems:
            raise ValueError("invalid drift policy: " + "; ".join(problems))


@dataclass(frozen=True)
class Observation:
    """One windowed measurement of the live pair."""

    accept_length: float | None  # mean accepted tokens per verification step, bonus token included
    verify_steps: float = 0.0  # verification steps the window holds (the evidence behind the value)
    reachable: bool = True  # False: no metrics this time
    speculating: bool | None = None  # False: the server answers without speculative decoding
    detail: str = ""  # why unreachable / what was seen, for the status message


@dataclass(frozen=True)
class Baseline:
    """The accepted length the serving draft had when it passed its gate."""

    accept_length: float
    draft_version: str = ""
    target_revision: str = ""
    recorded_at: str = ""  # ISO 8601, UTC
    source: str = ""  # where it came from (a report path, "gate", "learned")

    def __post_init__(self) -> None:
        if not (math.isfinite(self.accept_length) and self.accept_length >= 1.0):
            raise ValueError(
                f"baseline accepted length must be a number >= 1.0 (it counts the bonus token), "
                f"got {self.accept_length!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        if "accept_length" not in data:
            raise ValueError(f"baseline record has no 'accept_length' (keys: {sorted(data)})")
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        return cls(**{**known, "accept_length": float(known["accept_length"])})


def load_baseline(path: str | Path, draft_version: str = "") -> Baseline:
    """A baseline from a file: a baseline record written by the monitor (``accept_length``), an
    evaluation ``report.json`` (``macro.tau``) or ``summary.json`` (``macro_accept_length``)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"baseline file {p}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"baseline file {p}: expected a JSON object, got {type(data).__name__}")
    if "accept_length" in data:
        base = Baseline.from_dict(data)
        return replace(base, draft_version=base.draft_version or draft_version, source=base.source or str(p))
    if isinstance(data.get("macro"), dict) and "tau" in data["macro"]:
        value = data["macro"]["tau"]
    elif "macro_accept_length" in data:
        value = data["macro_accept_length"]
    else:
        raise ValueError(
            f"baseline file {p}: no accepted length found; expected 'accept_length' (monitor baseline), "
            "'macro.tau' (deepspec eval report.json) or 'macro_accept_length' (summary.json)"
        )
    return Baseline(float(value), draft_version=draft_version, source=str(p))


def save_baseline(path: str | Path, baseline: Baseline) -> None:
    from deepspec.storage import atomic_write_json

    atomic_write_json(Path(path), baseline.to_dict())


@dataclass(frozen=True)
class DriftStatus:
    """The decision plus the clocks it needs next time (times are Unix seconds)."""

    state: DriftState
    observed: float | None = None
    baseline: float | None = None
    ratio: float | None = None  # observed / baseline
    verify_steps: float = 0.0
    below_since: float | None = None  # start of the current below-baseline stretch
    last_below_at: float | None = None  # last measurement that was below the threshold
    changed_at: float | None = None  # when ``state`` last changed
    reason: str = ""

    @property
    def drift(self) -> bool:
        return self.state is DriftState.DRIFT

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriftStatus:
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        try:
            known["state"] = DriftState(known.get("state", DriftState.INSUFFICIENT_DATA.value))
        except ValueError as e:
            raise ValueError(f"drift status: unknown state {data.get('state')!r}") from e
        return cls(**known)

    def to_status(self) -> dict[str, Any]:
        """The operator's ``status.drift`` shape: observed, baseline, since (RFC 3339) and state."""
        since = self.below_since if self.state in (DriftState.DRIFT, DriftState.BELOW_BASELINE) else None
        return {
            "state": self.state.value,
            "drift": self.drift,
            "observed": None if self.observed is None else round(self.observed, 4),
            "baseline": self.baseline,
            "since": _rfc3339(since),
            "reason": self.reason,
        }


def _rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Decision:
    state: DriftState
    reason: str
    below_since: float | None = None
    last_below_at: float | None = None


def evaluate_drift(
    previous: DriftStatus | None,
    observation: Observation,
    baseline: Baseline | float | None,
    policy: DriftPolicy,
    now: float,
) -> DriftStatus:
    """The new status from the previous one and this measurement (pure)."""
    base = baseline.accept_length if isinstance(baseline, Baseline) else baseline
    prev_since = previous.below_since if previous else None
    prev_last = previous.last_below_at if previous else None
    observed = observation.accept_length

    if not observation.reachable:
        d = _Decision(DriftState.MISSING, observation.detail or "no metrics", prev_since, prev_last)
        observed = None
    elif observation.speculating is False:
        d = _Decision(DriftState.NO_SPECULATION, observation.detail or "the server does not speculate")
        observed = None
    elif observed is None or observation.verify_steps < policy.min_verify_steps:
        d = _Decision(
            DriftState.INSUFFICIENT_DATA,
            f"{observation.verify_steps:g} verification steps in the window, "
            f"{policy.min_verify_steps:g} needed for a decision",
            prev_since,
            prev_last,
        )
    elif observed <= policy.broken_below:
        d = _Decision(
            DriftState.BROKEN,
            f"accepted length {observed:.3f} <= {policy.broken_below:g}: every draft token is rejected; "
            "check that the draft loaded and that its vocabulary mapping matches the target",
        )
    elif base is None:
        d = _Decision(DriftState.NO_BASELINE, "no baseline recorded for this draft")
    else:
        threshold = base * (1.0 - policy.tolerance)
        if observed < threshold:
            resume = prev_since is not None and prev_last is not None and now - prev_last <= policy.duration_s
            since = prev_since if resume else now
            below_for = now - since
            state = DriftState.DRIFT if below_for >= policy.duration_s else DriftState.BELOW_BASELINE
            d = _Decision(
                state,
                f"accepted length {observed:.3f} below {threshold:.3f} (baseline {base:.3f} - "
                f"{policy.tolerance:.0%}) for {below_for:.0f} s of {policy.duration_s:.0f} s",
                since,
                now,
            )
        else:
            d = _Decision(DriftState.OK, f"accepted length {observed:.3f} >= {threshold:.3f}")

    changed_at = previous.changed_at if previous and previous.state is d.state else now
    return DriftStatus(
        state=d.state,
        observed=observed,
        baseline=base,
        ratio=(observed / base) if observed is not None and base else None,
        verify_steps=observation.verify_steps,
        below_since=d.below_since,
        last_below_at=d.last_below_at,
        changed_at=changed_at,
        reason=d.reason,
    )
