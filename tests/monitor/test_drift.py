"""The drift decision: states, the duration clock, gaps, baselines (time is passed in)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepspec.monitor.drift import (
    Baseline,
    DriftPolicy,
    DriftState,
    DriftStatus,
    Observation,
    evaluate_drift,
    load_baseline,
    save_baseline,
)

POLICY = DriftPolicy(tolerance=0.1, duration_s=600, min_verify_steps=100, broken_below=1.1)
T0 = 1_800_000_000.0


def run(values: list[tuple[float, Observation]], baseline: float | None = 3.0) -> list[DriftStatus]:
    status, out = None, []
    for t, obs in values:
        status = evaluate_drift(status, obs, baseline, POLICY, T0 + t)
        out.append(status)
    return out


def obs(length: float | None, steps: float = 1000, **kw: object) -> Observation:
    return Observation(length, steps, **kw)  # type: ignore[arg-type]


def test_drift_turns_true_after_the_duration_and_not_before() -> None:
    # 3.0 baseline, threshold 2.7; below from t=300 on
    seq = [(t, obs(3.0 if t < 300 else 2.5)) for t in range(0, 1201, 60)]
    states = {t: s for (t, _), s in zip(seq, run(seq), strict=True)}
    assert states[240].state is DriftState.OK
    assert states[300].state is DriftState.BELOW_BASELINE and states[300].below_since == T0 + 300
    assert not states[840].drift  # 540 s below
    assert states[900].drift and states[900].state is DriftState.DRIFT  # 600 s below
    assert states[1200].drift and states[1200].ratio == pytest.approx(2.5 / 3.0)
    assert states[900].to_status()["since"] == "2027-01-15T08:05:00Z"


def test_within_tolerance_is_not_below_and_recovery_resets_the_clock() -> None:
    seq = [(0, obs(2.75)), (300, obs(2.6)), (600, obs(2.9)), (660, obs(2.6)), (1200, obs(2.6))]
    s = run(seq)
    assert s[0].state is DriftState.OK  # 2.75 >= 2.7
    assert s[1].state is DriftState.BELOW_BASELINE
    assert s[2].state is DriftState.OK and s[2].below_since is None
    assert s[3].below_since == T0 + 660  # the clock started again
    assert s[4].state is DriftState.BELOW_BASELINE  # 540 s, not 900


def test_low_traffic_and_missing_data_are_not_drift_and_keep_the_clock() -> None:
    seq = [
        (0, obs(2.0)),  # below
        (300, obs(None, steps=0)),  # no traffic
        (420, obs(1.8, steps=20)),  # some traffic, too little to decide on
        (480, obs(None, reachable=False, detail="connection refused")),
        (600, obs(2.0)),  # below again: 600 s since first below, gaps < duration
    ]
    s = run(seq)
    assert s[1].state is DriftState.INSUFFICIENT_DATA and not s[1].drift
    assert s[2].state is DriftState.INSUFFICIENT_DATA
    assert s[3].state is DriftState.MISSING and s[3].reason == "connection refused" and s[3].observed is None
    assert s[4].drift and s[4].below_since == T0


def test_a_gap_longer_than_the_duration_restarts_the_clock() -> None:
    s = run([(0, obs(2.0)), (300, obs(None, steps=0)), (1000, obs(2.0))])
    assert s[2].state is DriftState.BELOW_BASELINE and s[2].below_since == T0 + 1000


def test_no_traffic_for_hours_never_drifts() -> None:
    s = run([(t, obs(None, steps=0)) for t in range(0, 6 * 3600, 600)])
    assert {x.state for x in s} == {DriftState.INSUFFICIENT_DATA}


def test_accept_length_near_one_is_broken_not_drift() -> None:
    s = run([(t, obs(1.02)) for t in range(0, 1800, 300)])
    assert {x.state for x in s} == {DriftState.BROKEN}
    assert "vocabulary mapping" in s[-1].reason


def test_non_speculative_server_and_missing_baseline() -> None:
    assert run([(0, obs(None, speculating=False))])[0].state is DriftState.NO_SPECULATION
    s = run([(0, obs(2.0))], baseline=None)[0]
    assert s.state is DriftState.NO_BASELINE and s.observed == 2.0 and s.ratio is None


def test_status_round_trips_through_a_dict() -> None:
    s = run([(0, obs(2.0)), (300, obs(2.0)), (700, obs(2.0))])[-1]
    again = DriftStatus.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s and again.drift
    nxt = evaluate_drift(again, obs(2.0), 3.0, POLICY, T0 + 760)
    assert nxt.drift and nxt.changed_at == s.changed_at
    with pytest.raises(ValueError, match="unknown state"):
        DriftStatus.from_dict({"state": "panic"})


def test_policy_and_baseline_validation() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        DriftPolicy(tolerance=1.5)
    with pytest.raises(ValueError, match=r">= 1\.0"):
        Baseline(0.4)


def test_baseline_files(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"macro": {"tau": 3.21, "acceptance_ratio": 0.5}}))
    assert load_baseline(report, "run-a").accept_length == 3.21
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"macro_accept_length": 2.9}))
    assert load_baseline(summary).accept_length == 2.9
    own = tmp_path / "baseline.json"
    save_baseline(own, Baseline(3.3, "run-b", target_revision="v2", source="gate"))
    b = load_baseline(own)
    assert (b.accept_length, b.draft_version, b.target_revision) == (3.3, "run-b", "v2")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tau": 3}))
    with pytest.raises(ValueError, match=r"macro\.tau"):
        load_baseline(bad)


def test_a_source_that_raises_is_missing_data() -> None:
    from monitor_fakes import FakeClock

    from deepspec.monitor.service import Monitor, MonitorLabels

    class Exploding:
        def collect(self) -> None:
            raise KeyError("usage")

    mon = Monitor(
        Exploding(), MonitorLabels("m", "d", "vllm", "canary"), POLICY, 600, None, clock=FakeClock()
    )
    status = mon.tick()
    assert status.state is DriftState.MISSING and "KeyError" in status.reason and mon.failures == 1
