"""STS calibration (held-out ECE drops) and the hardware-aware prefix scheduler."""

from __future__ import annotations

import pytest
import torch

from deepspec.eval.calibration import (
    Calibration,
    CalibrationData,
    evaluate_held_out,
    expected_calibration_error,
    fit_sts,
)
from deepspec.eval.scheduler import CostCurve, PrefixScheduler, profile_cost_curve


def synthetic_rounds(n: int, g: int = 6, seed: int = 0) -> CalibrationData:
    """True per-slot acceptance a_k; the 'head' reports an over-confident, position-dependent distortion."""
    gen = torch.Generator().manual_seed(seed)
    true = torch.rand(n, g, generator=gen) * 0.6 + 0.3  # P(accept k | prefix) in [0.3, 0.9]
    accept = torch.rand(n, g, generator=gen) < true
    accepted = torch.where(accept.all(1), torch.full((n,), g), (~accept).float().argmax(1))
    logit = torch.log(true) - torch.log1p(-true)
    temps = torch.linspace(0.4, 0.25, g)  # sharper than the truth, more so at later positions
    reported = torch.sigmoid(logit / temps)
    return CalibrationData(reported, accepted)


def test_ece_definition():
    assert expected_calibration_error(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])) == pytest.approx(
        0.0
    )
    assert expected_calibration_error(torch.tensor([0.9, 0.9]), torch.tensor([0.0, 0.0])) == pytest.approx(
        0.9
    )


def test_sts_lowers_held_out_ece(tmp_path):
    data = synthetic_rounds(4000)
    fit, held = data.split(held_out=0.5, seed=1)
    cal = evaluate_held_out(fit, held)
    assert cal.mean_ece_after < cal.mean_ece_before
    assert cal.mean_ece_after < 0.5 * cal.mean_ece_before
    assert all(t > 1.0 for t in cal.temperatures)  # over-confident head -> softened
    back = Calibration.load(cal.save(tmp_path / "calibration.json"))
    assert back.temperatures == cal.temperatures
    c = torch.tensor([0.9, 0.8, 0.7])
    assert torch.allclose(back.apply(c), cal.apply(c))


def test_sts_is_sequential():
    """Position 2 is fitted given the calibrated position 1: refitting with T_1 fixed changes nothing."""
    data = synthetic_rounds(2000, g=3, seed=3)
    cal = fit_sts(data)
    assert len(cal.temperatures) == 3
    partial = fit_sts(CalibrationData(data.confidence[:, :2], torch.clamp(data.accepted, max=2)))
    assert partial.temperatures == cal.temperatures[:2]


def test_from_rounds_handles_variable_lengths():
    d = CalibrationData.from_rounds([([0.9, 0.5], 1), ([0.7], 0), ([0.8, 0.8, 0.8], 3)])
    assert d.confidence.shape == (3, 3) and torch.isnan(d.confidence[1, 1])
    assert d.survival_labels().tolist() == [[1, 0, 0], [0, 0, 0], [1, 1, 1]]


def test_scheduler_maximises_expected_tokens_per_second():
    flat = PrefixScheduler(CostCurve([1.0] * 8))  # memory-bound: verifying more is free
    assert flat.choose(torch.tensor([0.9, 0.5, 0.1, 0.1])) == 4
    steep = PrefixScheduler(CostCurve([1.0, 2.0, 3.0, 4.0, 5.0]))  # every token costs a full step
    assert steep.choose(torch.tensor([0.9, 0.9, 0.9, 0.9])) == 0
    mid = PrefixScheduler(CostCurve([1.0, 1.1, 1.2, 1.3, 1.4]))
    # E[g]/t(g+1): g=0 1.0, g=1 1.9/1.1=1.73, g=2 (1.9+0.45)/1.2=1.96, g=3 (2.35+0.045)/1.3=1.84 -> stop at 2
    assert mid.choose(torch.tensor([0.9, 0.5, 0.1, 0.9])) == 2
    assert mid.decisions == [2]


def test_cost_curve_extrapolates_and_roundtrips():
    c = CostCurve.from_steps_per_second([100.0, 50.0], draft_seconds=0.001)
    assert c.round_seconds(1) == pytest.approx(0.011) and c.round_seconds(4) == pytest.approx(
        0.001 + 0.02 + 0.02
    )
    assert CostCurve.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        CostCurve([])


def test_profile_cost_curve_on_tiny_target(tiny_llama_target):
    curve = profile_cost_curve(tiny_llama_target, max_tokens=3, context_len=16, repeats=2, warmup=1)
    assert len(curve.seconds) == 3 and all(s > 0 for s in curve.seconds)
