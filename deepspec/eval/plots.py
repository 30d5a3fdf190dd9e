"""PNG plots of an evaluation report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_acceptance(report: dict[str, Any], path: str | Path) -> Path:
    """Per-position conditional acceptance and cumulative survival, one line per benchmark."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, b in report["benchmarks"].items():
        ks = list(range(1, len(b["conditional_acceptance"]) + 1))
        ax1.plot(ks, b["conditional_acceptance"], marker="o", label=name)
        ax2.plot(ks, b["cumulative_acceptance"], marker="o", label=name)
    ax1.set(title="conditional acceptance", xlabel="draft position k", ylabel="P(accept k | 1..k-1 accepted)")
    ax2.set(title="cumulative survival", xlabel="draft position k", ylabel="P(1..k accepted)")
    for ax in (ax1, ax2):
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"{report['algorithm']} on {report['target']}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_tau(report: dict[str, Any], path: str | Path) -> Path:
    """Accepted length tau per benchmark with the macro average."""
    plt = _pyplot()
    names = list(report["benchmarks"])
    taus = [report["benchmarks"][n]["tau"] for n in names]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 4), constrained_layout=True)
    bars = ax.bar(names, taus, color="#4c72b0")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    macro = report["macro"]["tau"]
    ax.axhline(macro, color="#dd8452", linestyle="--", label=f"macro {macro:.2f}")
    ax.set(ylabel="accepted length tau (incl. bonus)", title=f"{report['algorithm']}: tau per benchmark")
    ax.set_ylim(0, max([*taus, 1.0]) * 1.15)
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
