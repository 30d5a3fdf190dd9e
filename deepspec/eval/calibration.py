"""Sequential Temperature Scaling (STS) of DSpark's confidence head (beyond the reference implementation).

The confidence head predicts ``c_k`` = P(slot k accepted | slots < k accepted); what the engine uses is
the prefix survival ``s_k = prod_{j<=k} c_j`` (confidence threshold, prefix scheduler). Errors compound
along the product, so each position gets its own temperature ``T_k`` applied to the logit,
``c'_k = sigmoid(logit(c_k) / T_k)``, fitted **left to right**: ``T_1`` minimises the expected
calibration error (ECE) of ``s'_1`` against the label "slot 1 accepted", then with ``T_1`` fixed
``T_2`` minimises the ECE of ``s'_2 = c'_1 c'_2`` against "slots 1..2 accepted", and so on.

Data come from real rounds of the engine (``EngineConfig.record_rounds``): the raw confidences of the
proposed slots and the number accepted. Fit on one split, report ECE before/after on a held-out split.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_GRID = tuple(math.exp(x / 20.0) for x in range(-60, 61))  # T in [e^-3, e^3], log-spaced


def expected_calibration_error(pred: torch.Tensor, label: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width bins: sum_b |B|/N * |mean(pred in b) - mean(label in b)|."""
    pred = pred.float().flatten()
    label = label.float().flatten()
    n = pred.numel()
    if n == 0:
        return 0.0
    idx = torch.clamp((pred * bins).long(), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        cnt = int(m.sum())
        if cnt:
            ece += cnt / n * abs(float(pred[m].mean()) - float(label[m].mean()))
    return ece


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


@dataclass
class CalibrationData:
    """Per-round confidences [N, G] (NaN where a slot was not proposed) and accepted counts [N]."""

    confidence: torch.Tensor
    accepted: torch.Tensor

    @classmethod
    def from_rounds(cls, rounds: Sequence[tuple[Sequence[float], int]]) -> CalibrationData:
        g = max((len(c) for c, _ in rounds), default=0)
        conf = torch.full((len(rounds), g), float("nan"))
        for i, (c, _) in enumerate(rounds):
            if len(c):
                conf[i, : len(c)] = torch.tensor(list(c), dtype=torch.float32)
        acc = torch.tensor([a for _, a in rounds], dtype=torch.long)
        return cls(conf, acc)

    def split(self, held_out: float = 0.5, seed: int = 0) -> tuple[CalibrationData, CalibrationData]:
        perm = torch.randperm(len(self.accepted), generator=torch.Generator().manual_seed(seed))
        cut = round(len(perm) * (1 - held_out))
        a, b = perm[:cut], perm[cut:]
        return CalibrationData(self.confidence[a], self.accepted[a]), CalibrationData(
            self.confidence[b], self.accepted[b]
        )

    def survival_labels(self) -> torch.Tensor:
        """[N, G] 1 where slots 1..k were all accepted."""
        k = torch.arange(1, self.confidence.shape[1] + 1)
        return (self.accepted[:, None] >= k[None, :]).float()


@dataclass
class Calibration:
    """Per-position temperatures and the ECE of the prefix survival before/after, per position."""

    temperatures: list[float]
    ece_before: list[float] = field(default_factory=list)
    ece_after: list[float] = field(default_factory=list)

    def apply(self, confidence: torch.Tensor) -> torch.Tensor:
        """Calibrated per-slot confidences ``c'_k`` (positions past the fitted ones use the last T)."""
        if not self.temperatures:
            return confidence
        g = confidence.shape[-1]
        temps = torch.tensor(
            [self.temperatures[min(k, len(self.temperatures) - 1)] for k in range(g)],
            dtype=torch.float32,
            device=confidence.device,
        )
        return torch.sigmoid(_logit(confidence.float()) / temps)

    @property
    def mean_ece_before(self) -> float:
        return sum(self.ece_before) / len(self.ece_before) if self.ece_before else 0.0

    @property
    def mean_ece_after(self) -> float:
        return sum(self.ece_after) / len(self.ece_after) if self.ece_after else 0.0

    def to_dict(self) -> dict:
        return {
            "method": "sequential_temperature_scaling",
            "temperatures": self.temperatures,
            "ece_before": self.ece_before,
            "ece_after": self.ece_after,
            "mean_ece_before": self.mean_ece_before,
            "mean_ece_after": self.mean_ece_after,
        }

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        if "temperatures" not in d:
            raise ValueError(f"{path}: not a calibration file (no 'temperatures' key)")
        return cls(list(d["temperatures"]), list(d.get("ece_before", [])), list(d.get("ece_after", [])))


def survival_ece(
    data: CalibrationData, calibration: Calibration | None = None, bins: int = 15
) -> list[float]:
    """ECE of the prefix survival at each position, over rounds that proposed that position."""
    conf = data.confidence
    if calibration is not None:
        conf = torch.where(torch.isnan(conf), conf, calibration.apply(torch.nan_to_num(conf, nan=0.5)))
    labels = data.survival_labels()
    surv = torch.cumprod(torch.nan_to_num(conf, nan=1.0), dim=1)
    out = []
    for k in range(conf.shape[1]):
        m = ~torch.isnan(conf[:, k])
        out.append(expected_calibration_error(surv[m, k], labels[m, k], bins))
    return out


def fit_sts(data: CalibrationData, grid: Sequence[float] = DEFAULT_GRID, bins: int = 15) -> Calibration:
    """Fit per-position temperatures left to right, minimising the ECE of the cumulative product."""
    conf = data.confidence
    labels = data.survival_labels()
    n, g = conf.shape
    logits = _logit(torch.nan_to_num(conf, nan=0.5))
    prefix = torch.ones(n)  # calibrated survival up to k-1
    temps: list[float] = []
    for k in range(g):
        m = ~torch.isnan(conf[:, k])
        if not bool(m.any()):
            temps.append(temps[-1] if temps else 1.0)
            continue
        best_t, best_e = 1.0, float("inf")
        for t in grid:
            e = expected_calibration_error(prefix[m] * torch.sigmoid(logits[m, k] / t), labels[m, k], bins)
            if e < best_e - 1e-12 or (abs(e - best_e) <= 1e-12 and abs(math.log(t)) < abs(math.log(best_t))):
                best_t, best_e = t, e
        temps.append(best_t)
        prefix = prefix * torch.where(m, torch.sigmoid(logits[:, k] / best_t), torch.ones(n))
    cal = Calibration(temps)
    cal.ece_before = survival_ece(data, None, bins)
    cal.ece_after = survival_ece(data, cal, bins)
    return cal


def evaluate_held_out(train: CalibrationData, held_out: CalibrationData, bins: int = 15) -> Calibration:
    """Fit on ``train``; the returned ECE before/after are measured on ``held_out``."""
    cal = fit_sts(train, bins=bins)
    cal.ece_before = survival_ece(held_out, None, bins)
    cal.ece_after = survival_ece(held_out, cal, bins)
    return cal
