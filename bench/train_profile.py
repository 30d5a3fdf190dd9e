"""One torch.profiler run of a few training steps: where a step's time goes.

Writes the ``key_averages()`` table (sorted by self device time on CUDA, self CPU time on CPU; 30 rows)
and per-step counts of what makes a small-target step host-bound: kernel launches, host<->device copies
and ``aten::to``, synchronisations (``.item()``, ``nonzero``), plus the device-busy fraction of the
profiled wall time (near 1: the GPU is the limit; far below: launches and syncs are).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

#: per-step counters: name -> predicate on a profiler event key (CPU-side events unless noted)
COUNTERS = {
    "kernel_launches": lambda k: "LaunchKernel" in k,  # cudaLaunchKernel(ExC), cuLaunchKernel(Ex)
    "graph_launches": lambda k: k.startswith("cudaGraphLaunch"),
    "memcpy_calls": lambda k: k.startswith(("cudaMemcpy", "cuMemcpy")),
    "synchronize_calls": lambda k: k.startswith("cuda") and "Synchronize" in k,
    "aten::to": lambda k: k == "aten::to",
    "aten::_to_copy": lambda k: k == "aten::_to_copy",
    "aten::copy_": lambda k: k == "aten::copy_",
    "aten::item": lambda k: k == "aten::item",
    "aten::nonzero": lambda k: k == "aten::nonzero",
}


def _on_device(event: Any) -> bool:
    """A kernel, copy or memset that ran on the GPU (the events the table's "Self CUDA time total" sums)."""
    from torch.autograd import DeviceType

    return event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


def step_counts(averages: Any, steps: int) -> dict[str, float]:
    """Per-step counts of :data:`COUNTERS` and of kernels that ran on the device, from ``key_averages()``."""
    out = {name: sum(e.count for e in averages if match(e.key)) / steps for name, match in COUNTERS.items()}
    kernels = (e for e in averages if _on_device(e) and not e.key.startswith(("Memcpy", "Memset")))
    out["device_kernels"] = sum(e.count for e in kernels) / steps
    return out


def profile_steps(trainer: Any, steps: int, path: str, header: str = "") -> dict[str, Any]:
    """Profile ``steps`` optimizer steps of a warmed-up ``trainer`` into ``path``; returns a summary."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from deepspec.train.trainer import StepStats

    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(trainer.device)

    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            with record_function("train_step"):
                trainer.train_step(StepStats())
        sync()
        wall = time.perf_counter() - t0
    averages = prof.key_averages()
    # torch < 2.4 names the device column after CUDA only
    device_column = (
        "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
    )
    sort_by = device_column if cuda else "self_cpu_time_total"
    device_s = sum(getattr(e, device_column) for e in averages if _on_device(e)) / 1e6
    counts = step_counts(averages, steps)
    summary: dict[str, Any] = {
        "path": path,
        "steps": steps,
        "profiled_step_s": wall / steps,
        "device_busy_fraction": device_s / wall if cuda else None,
        "per_step": counts,
    }
    lines = [
        f"# torch.profiler: {header}",
        f"# profiled wall time per step {wall / steps:.4f} s (with profiler overhead)",
    ]
    if cuda:
        lines.append(
            f"# device busy {device_s / steps:.4f} s per step = {100 * device_s / wall:.1f}% of the wall time"
        )
    lines.append("# per step: " + ", ".join(f"{k} {v:,.1f}" for k, v in counts.items()))
    lines += ["", averages.table(sort_by=sort_by, row_limit=30)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    return summary
