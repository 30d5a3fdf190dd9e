"""Training metrics: JSONL + TensorBoard writers, tau estimate, MFU estimate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak FLOP/s by device-name fragment (for the MFU estimate only).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H20": 148e12,
    "A100": 312e12,
    "L40": 181e12,
    "A10": 125e12,
}


def tau_estimate(position_acceptance: torch.Tensor) -> float:
    """Training-time accepted length: 1 + sum_k prod_{j<=k} acc_j."""
    acc = position_acceptance.detach().float().clamp(0, 1)
    return float(1.0 + torch.cumprod(acc, dim=0).sum())


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class MetricsLogger:
    """Rank-0 writer of ``metrics.jsonl`` and TensorBoard scalars (no-op on other ranks)."""

    def __init__(self, out_dir: str | Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
