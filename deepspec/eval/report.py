"""Evaluation report: JSON (full), Markdown table, compact summary for the operator (< 4 KiB).

Report shape (``report.json``)::

    {"v": 1, "algorithm", "target", "target_revision", "checkpoint", "created", "world_size",
     "protocol": {temperature, num_proposals, max_new_tokens, all_turns, thinking, seed, ...},
     "benchmarks": {name: {prompts, rounds, tau, acceptance_ratio, mean_proposal_length,
                           conditional_acceptance [g], cumulative_acceptance [g], tokens_per_second,
                           baseline_tokens_per_second, speedup, verify_rate, counters, baseline_counters}},
     "macro": {tau, acceptance_ratio, speedup}, "calibration": {...} | absent}
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deepspec.eval.metrics import AcceptanceStats, macro_average
from deepspec.eval.summary import EvalSummary
from deepspec.storage import atomic_write_json, atomic_write_text


def build_report(
    results: dict[str, tuple[AcceptanceStats, AcceptanceStats | None]],
    *,
    algorithm: str,
    target: str,
    target_revision: str | None,
    checkpoint: str | None,
    protocol: dict[str, Any],
    world_size: int = 1,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``results[name] = (speculative stats, baseline stats or None)``."""
    benches: dict[str, Any] = {}
    for name, (spec, base) in results.items():
        entry = spec.summary()
        entry["counters"] = spec.to_dict()
        if base is not None and base.rounds:
            entry["baseline_tokens_per_second"] = base.tokens_per_second
            entry["speedup"] = (
                spec.tokens_per_second / base.tokens_per_second if base.tokens_per_second else None
            )
            entry["baseline_counters"] = base.to_dict()
        else:
            entry["baseline_tokens_per_second"] = None
            entry["speedup"] = None
        benches[name] = entry
    speedups = [b["speedup"] for b in benches.values() if b["speedup"] is not None]
    # a benchmark whose answers all stopped before a verification round measured nothing (its tau reads 0,
    # below the minimum of 1): the macro averages the benchmarks that were measured
    measured = [b for b in benches.values() if b["rounds"]]
    report: dict[str, Any] = {
        "v": 1,
        "algorithm": algorithm,
        "target": target,
        "target_revision": target_revision,
        "checkpoint": checkpoint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "world_size": world_size,
        "protocol": protocol,
        "benchmarks": benches,
        "macro": {
            "tau": macro_average([b["tau"] for b in measured]),
            "acceptance_ratio": macro_average([b["acceptance_ratio"] for b in measured]),
            "speedup": macro_average(speedups) if speedups else None,
        },
    }
    if calibration is not None:
        report["calibration"] = calibration
    return report


def compact_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The operator's view (:class:`~deepspec.eval.summary.EvalSummary`): macro tau and per-benchmark
    tau / acceptance ratio / prompt count."""
    return EvalSummary.from_report(report).model_dump()


def summary_json(report: dict[str, Any]) -> str:
    return EvalSummary.from_report(report).to_json()


def markdown_table(report: dict[str, Any]) -> str:
    g = max((len(b["conditional_acceptance"]) for b in report["benchmarks"].values()), default=0)

    def fmt(x: Any, nd: int = 2) -> str:
        return "-" if x is None else f"{x:.{nd}f}"

    lines = [
        f"## Accepted length: {report['algorithm']} on {report['target']}",
        "",
        f"checkpoint `{report.get('checkpoint')}`, target revision `{report.get('target_revision')}`, "
        f"T={report['protocol'].get('temperature')}, {report['protocol'].get('num_proposals')} proposals, "
        f"max {report['protocol'].get('max_new_tokens')} new tokens",
        "",
        "| benchmark | prompts | rounds | tau | acc. ratio | mean proposal | tok/s spec | tok/s base | speedup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, b in report["benchmarks"].items():
        lines.append(
            f"| {name} | {b['prompts']} | {b['rounds']} | {b['tau']:.3f} | {b['acceptance_ratio']:.3f} | "
            f"{b['mean_proposal_length']:.2f} | {fmt(b['tokens_per_second'], 1)} | "
            f"{fmt(b['baseline_tokens_per_second'], 1)} | {fmt(b['speedup'])} |"
        )
    m = report["macro"]
    lines.append(
        f"| **macro** | | | **{m['tau']:.3f}** | {m['acceptance_ratio']:.3f} | | | | {fmt(m['speedup'])} |"
    )
    if g:
        lines += [
            "",
            "Per-position conditional acceptance (accepted at k given 1..k-1 accepted):",
            "",
            "| benchmark | " + " | ".join(f"k={k}" for k in range(1, g + 1)) + " |",
            "|---|" + "---:|" * g,
        ]
        for name, b in report["benchmarks"].items():
            vals = [*b["conditional_acceptance"], *([None] * (g - len(b["conditional_acceptance"])))]
            lines.append(f"| {name} | " + " | ".join(fmt(v) for v in vals) + " |")
    if "calibration" in report:
        c = report["calibration"]
        lines += ["", f"STS calibration: ECE {c['mean_ece_before']:.4f} -> {c['mean_ece_after']:.4f}"]
    lines += ["", "How to read this:", "", *[f"- {note}" for note in reading_notes(report)]]
    return "\n".join(lines) + "\n"


_STEP = re.compile(r"step_(\d+)/?$")


def reading_notes(report: dict[str, Any]) -> list[str]:
    """What the figures mean and when the speedup is no speedup figure (printed under the table).

    The speedup is decomposed from measured counters: one verification round (draft proposals plus one
    target forward over them) took ``round_cost`` plain decoding steps, so ``speedup = tau / round_cost``.
    On anything but a GPU the wall clock of a small target is dominated by per-call host overhead, not by
    the arithmetic speculation saves, so that figure says nothing about serving.
    """
    p, m = report["protocol"], report["macro"]
    g = p.get("num_proposals")
    notes = [
        f"Accepted length tau = tokens committed per target forward, the corrected/bonus token included: "
        f"1.0 means no draft token was ever accepted, {g + 1 if g else 'proposals + 1'} is the ceiling."
    ]
    if report["algorithm"] == "ngram":
        notes.append(
            "This is the n-gram (prompt lookup) floor: a model-free drafter copying continuations of the "
            "prompt. A trained draft is only worth serving above this accepted length on the same prompts."
        )
    else:
        notes.append(
            "Compare with the model-free n-gram (prompt lookup) floor on the same prompts "
            "(`deepspec eval --drafter ngram`, same recipe): a draft below it is not worth serving."
        )
        step = _STEP.search(str(report.get("checkpoint") or ""))
        if step:
            notes.append(
                f"The draft was trained for {int(step.group(1))} optimizer steps (`step_{step.group(1)}`)."
            )
    rounds = [
        b
        for b in report["benchmarks"].values()
        if b.get("verify_rate") and b.get("baseline_tokens_per_second") and b.get("speedup")
    ]
    if rounds:
        cost = macro_average([b["baseline_tokens_per_second"] / b["verify_rate"] for b in rounds])
        notes.append(
            f"Speedup {m['speedup']:.2f}x: one verification round (draft proposals + one target forward) took "
            f"{cost:.2f}x the time of a plain decoding step (macro), so speedup is about tau / {cost:.2f}."
        )
    device = p.get("device")
    if m.get("speedup") is not None and device != "cuda":
        notes.append(
            f"**The speedup is not meaningful here**: it was measured on {device or 'an unknown device'}, where "
            "the wall clock of a small target is host-bound (per-call overhead, not the arithmetic that "
            "speculation saves). Read the accepted length; speedup figures come from a GPU run."
        )
    return notes


def write_report(
    report: dict[str, Any], out_dir: str | Path, termination_log: str | None = None
) -> dict[str, Path]:
    """Write report.json, report.md, summary.json and the plots; optionally the termination log."""
    from deepspec.eval.plots import plot_acceptance, plot_tau

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "summary": out / "summary.json",
        "acceptance_plot": out / "acceptance.png",
        "tau_plot": out / "tau.png",
    }
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["markdown"], markdown_table(report))
    summary = summary_json(report)
    atomic_write_text(paths["summary"], summary + "\n")
    plot_acceptance(report, paths["acceptance_plot"])
    plot_tau(report, paths["tau_plot"])
    if termination_log:
        Path(termination_log).write_text(summary, encoding="utf-8")
    return paths
