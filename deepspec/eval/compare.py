"""Results document from several evaluation reports (``deepspec eval --compare REPORT... --output DIR``).

Input: ``report.json`` files (or the folders holding them) of the drafts and of the n-gram floor, at one
or more temperatures; a ``batch_sweep.json`` beside a report (``deepspec eval --batch-size``) adds its
speedup-against-batch curve; a training output folder beside a report's checkpoint (``metrics.jsonl``,
``selection.json``) adds training time, throughput, curves and the checkpoint selection. A report is
named by its algorithm (``ngram`` is the floor) or by ``LABEL=PATH``.

Output: ``results.md`` (or ``--name``) and its PNG plots in DIR:

* accepted length per benchmark and macro, one column per draft plus the n-gram floor, one table per
  temperature, with the ratio of each macro to the floor's;
* per-position conditional acceptance of each draft, micro-averaged over benchmarks from the counters;
* speedup against batch size (when swept), training time / throughput / curves, checkpoint selection;
* the issue's goals, each met or missed with the margin, computed from the same figures;
* the commands that produced the reports (``--commands FILE``), date and machine.

Nothing here decodes or trains: every figure is read from the files given, so the document can only
hold measured numbers.
"""

from __future__ import annotations

import itertools
import json
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deepspec.eval.metrics import AcceptanceStats, macro_average
from deepspec.eval.plots import _pyplot
from deepspec.storage import atomic_write_text

FLOOR = "ngram"
ORDER = ("eagle3", "dflash", "dspark")  # the paper's ordering, weakest first
GOAL_TAU, GOAL_FLOOR_RATIO, GOAL_SPEEDUP = 3.0, 1.5, 1.5


class CompareError(ValueError):
    """A report cannot be compared (the message names the file and what is wrong)."""


@dataclass
class LoadedReport:
    label: str
    path: Path
    report: dict[str, Any]
    sweep: list[dict[str, Any]] = field(default_factory=list)  # batch_sweep.json rows
    training: dict[str, Any] | None = None  # summary of metrics.jsonl
    curve: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows
    selection: dict[str, Any] | None = None

    @property
    def temperature(self) -> float:
        return float(self.report["protocol"].get("temperature", 1.0))

    @property
    def is_floor(self) -> bool:
        return self.report["algorithm"] == FLOOR

    @property
    def macro(self) -> float:
        return float(self.report["macro"]["tau"])

    def conditional(self) -> list[float | None]:
        """Pooled conditional acceptance per position; None where no round reached that position."""
        pooled = self.pooled()
        return [a / r if r else None for a, r in zip(pooled.accepted_at, pooled.reached, strict=True)]

    def pooled(self) -> AcceptanceStats:
        """The counters of every benchmark summed (micro average over benchmarks)."""
        total = AcceptanceStats()
        for b in self.report["benchmarks"].values():
            if b.get("counters"):
                total += AcceptanceStats.from_dict(b["counters"])
        return total


def load(spec: str) -> LoadedReport:
    """``[LABEL=]PATH`` -> the report, its batch sweep and its training logs when present."""
    label, _, path_text = spec.rpartition("=") if "=" in spec else ("", "", spec)
    path = Path(path_text)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise CompareError(f"{spec}: no report.json there (give a report.json or the folder holding one)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CompareError(f"{path}: not JSON ({e})") from None
    missing = [k for k in ("algorithm", "target", "benchmarks", "macro", "protocol") if k not in report]
    if missing:
        raise CompareError(f"{path}: not a deepspec evaluation report (no {', '.join(missing)})")
    loaded = LoadedReport(label or report["algorithm"], path, report)
    sweep = path.parent / "batch_sweep.json"
    if sweep.is_file():
        loaded.sweep = json.loads(sweep.read_text(encoding="utf-8"))["rows"]
    ckpt = report.get("checkpoint")
    if ckpt and not loaded.is_floor:
        folder = Path(ckpt).parent
        metrics = folder / "metrics.jsonl"
        if metrics.is_file():
            loaded.curve = [
                json.loads(x) for x in metrics.read_text(encoding="utf-8").splitlines() if x.strip()
            ]
            loaded.training = training_summary(loaded.curve)
        if (folder / "selection.json").is_file():
            loaded.selection = json.loads((folder / "selection.json").read_text(encoding="utf-8"))
    return loaded


def training_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Steps, epochs, tokens, time (sum of logged step times) and throughput of one training run."""
    time_s, prev = 0.0, 0
    for r in rows:
        time_s += float(r.get("step_time_s", 0.0)) * (int(r["step"]) - prev)
        prev = int(r["step"])
    last = rows[-1] if rows else {}
    tokens = int(last.get("tokens_seen", 0))
    mfu = [r["mfu"] for r in rows if "mfu" in r]
    return {
        "steps": int(last.get("step", 0)),
        "epochs": last.get("epoch"),
        "tokens": tokens,
        "time_s": time_s,
        "tokens_per_s": tokens / time_s if time_s else None,
        "final_loss": last.get("loss"),
        "final_sim_tau": last.get("tau"),
        "mfu": macro_average(mfu) if mfu else None,
        "peak_memory_gib": max((r["peak_memory_gib"] for r in rows if "peak_memory_gib" in r), default=None),
    }


def _fmt(x: Any, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _columns(reports: list[LoadedReport]) -> list[LoadedReport]:
    """Drafts in the paper's order (others after), the floor last."""

    def rank(r: LoadedReport) -> tuple[int, str]:
        algo = r.report["algorithm"]
        return (len(ORDER) + 1 if r.is_floor else ORDER.index(algo) if algo in ORDER else len(ORDER), r.label)

    return sorted(reports, key=rank)


def tau_table(reports: list[LoadedReport]) -> list[str]:
    """Accepted length per benchmark (rows) and report (columns), macro and ratio to the floor."""
    cols = _columns(reports)
    floor = next((r for r in cols if r.is_floor), None)
    names: list[str] = []
    for r in cols:
        names += [n for n in r.report["benchmarks"] if n not in names]
    lines = [
        "| benchmark | prompts | " + " | ".join(r.label for r in cols) + " |",
        "|---|---:|" + "---:|" * len(cols),
    ]
    for name in names:
        counts = {r.report["benchmarks"][name]["prompts"] for r in cols if name in r.report["benchmarks"]}
        n = str(counts.pop()) if len(counts) == 1 else "differs!"
        # no verification round = nothing measured (shown as '-', left out of the macro by the report)
        taus = [
            b.get("tau") if (b := r.report["benchmarks"].get(name, {})).get("rounds") else None for r in cols
        ]
        lines.append(f"| {name} | {n} | " + " | ".join(_fmt(t) for t in taus) + " |")
    lines.append("| **macro** | | " + " | ".join(f"**{r.macro:.2f}**" for r in cols) + " |")
    if floor is not None:
        lines.append(
            "| macro / floor | | " + " | ".join(f"{r.macro / floor.macro:.2f}x" for r in cols) + " |"
        )
    return lines


def acceptance_table(reports: list[LoadedReport]) -> list[str]:
    cols = [r for r in _columns(reports)]
    pooled = {r.label: r.conditional() for r in cols}
    g = max((len(v) for v in pooled.values()), default=0)
    if not g:
        return []
    lines = ["| drafter | " + " | ".join(f"k={k}" for k in range(1, g + 1)) + " |", "|---|" + "---:|" * g]
    for label, vals in pooled.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in [*vals, *[None] * (g - len(vals))]) + " |")
    return lines


def _finish(plt: Any, fig: Any, axes: list[Any], path: Path) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_acceptance(reports: list[LoadedReport], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    for r in _columns(reports):
        points = [(k, v) for k, v in enumerate(r.conditional(), start=1) if v is not None]
        ax.plot(
            [k for k, _ in points], [v for _, v in points], marker="o", label=f"{r.label} (tau {r.macro:.2f})"
        )
    ax.set(xlabel="draft position k", ylabel="P(accept k | 1..k-1 accepted)", ylim=(0, 1.02))
    ax.set_title(f"conditional acceptance, all benchmarks pooled, T={reports[0].temperature:g}")
    return _finish(plt, fig, [ax], path)


def plot_speedup(reports: list[LoadedReport], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    sizes: set[int] = set()
    for r in _columns(reports):
        rows = [x for x in r.sweep if x.get("speedup") is not None]
        sizes |= {x["batch_size"] for x in rows}
        ax.plot([x["batch_size"] for x in rows], [x["speedup"] for x in rows], marker="o", label=r.label)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(sizes), [str(s) for s in sorted(sizes)])
    ax.set(xlabel="batch size", ylabel="speedup over plain decoding")
    ax.set_title(f"speedup against batch size, T={reports[0].temperature:g}")
    return _finish(plt, fig, [ax], path)


def plot_training(reports: list[LoadedReport], path: Path) -> Path:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for r in reports:
        steps = [row["step"] for row in r.curve]
        ax1.plot(steps, [row.get("loss") for row in r.curve], label=r.label)
        if any("tau" in row for row in r.curve):
            ax2.plot(steps, [row.get("tau") for row in r.curve], label=r.label)
    ax1.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    ax2.set(title="simulated accepted length (training batches)", xlabel="optimizer step", ylabel="tau")
    return _finish(plt, fig, [ax1, ax2], path)


def sweep_table(reports: list[LoadedReport]) -> list[str]:
    swept = [r for r in _columns(reports) if r.sweep]
    sizes = sorted({x["batch_size"] for r in swept for x in r.sweep})
    lines = ["| drafter | " + " | ".join(f"B={b}" for b in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for r in swept:
        by = {x["batch_size"]: x.get("speedup") for x in r.sweep}
        lines.append(
            f"| {r.label} | " + " | ".join(_fmt(by.get(b)) + ("x" if by.get(b) else "") for b in sizes) + " |"
        )
    return lines


def training_table(reports: list[LoadedReport]) -> list[str]:
    lines = [
        "| draft | steps | epochs | tokens | time | tokens/s | MFU | peak GiB | final loss | selected (by tau) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in reports:
        t = r.training or {}
        sel = r.selection
        chosen = "-"
        if sel:
            best = next((c for c in sel["candidates"] if f"step_{c['step']}" == sel["selected"]), None)
            chosen = (
                f"{sel['selected']} (tau {best['accept_length']:.2f} on {sel['prompts']} held-out)"
                if best
                else sel["selected"]
            )
        lines.append(
            f"| {r.label} | {t.get('steps', '-')} | {_fmt(t.get('epochs'))} | {t.get('tokens', 0):,} | "
            f"{_fmt((t.get('time_s') or 0) / 60, 1)} min | {_fmt(t.get('tokens_per_s'), 0)} | "
            f"{_fmt(100 * t['mfu'], 1) + '%' if t.get('mfu') else '-'} | {_fmt(t.get('peak_memory_gib'), 1)} | "
            f"{_fmt(t.get('final_loss'), 3)} | {chosen} |"
        )
    return lines


def selection_table(reports: list[LoadedReport]) -> list[str]:
    lines = ["| draft | step | held-out tau | training loss |", "|---|---:|---:|---:|"]
    for r in reports:
        for c in (r.selection or {}).get("candidates", []):
            mark = " (selected)" if f"step_{c['step']}" == r.selection["selected"] else ""
            lines.append(
                f"| {r.label} | {c['step']}{mark} | {c['accept_length']:.3f} | {_fmt(c.get('train_loss'), 3)} |"
            )
    return lines


def goals(by_t: dict[float, list[LoadedReport]]) -> list[str]:
    """The issue's goals, each with its measured margin (or 'not measured')."""
    out = []
    for t, reports in sorted(by_t.items()):
        floor = next((r for r in reports if r.is_floor), None)
        drafts = [r for r in _columns(reports) if not r.is_floor]
        if floor is None or not drafts:
            out.append(
                f"- T={t:g}: drafts vs n-gram floor: not measured (need both a draft and an n-gram report)"
            )
            continue
        for d in drafts:
            diff = d.macro - floor.macro
            verdict = "met" if diff > 0 else "**missed**"
            out.append(
                f"- T={t:g}: {d.label} beats the n-gram floor: {verdict} ({d.macro:.2f} vs {floor.macro:.2f}, {diff:+.2f})"
            )
        algos = {d.report["algorithm"]: d.macro for d in drafts}
        present = [a for a in reversed(ORDER) if a in algos]
        if len(present) >= 2:
            ok = all(algos[a] >= algos[b] for a, b in itertools.pairwise(present))
            chain = " >= ".join(f"{a} {algos[a]:.2f}" for a in present)
            out.append(
                f"- T={t:g}: paper ordering {' >= '.join(present)}: {'met' if ok else '**missed**'} ({chain})"
            )
    zero = by_t.get(0.0, [])
    floor0 = next((r for r in zero if r.is_floor), None)
    drafts0 = [r for r in zero if not r.is_floor]
    if drafts0:
        best = max(drafts0, key=lambda r: r.macro)
        out.append(
            f"- best draft at T=0 ({best.label}) macro >= {GOAL_TAU}: {'met' if best.macro >= GOAL_TAU else '**missed**'} "
            f"({best.macro:.2f}, {best.macro - GOAL_TAU:+.2f})"
        )
        if floor0 is not None:
            ratio = best.macro / floor0.macro
            out.append(
                f"- best draft at T=0 >= {GOAL_FLOOR_RATIO}x the floor: {'met' if ratio >= GOAL_FLOOR_RATIO else '**missed**'} "
                f"({ratio:.2f}x)"
            )
        b1 = next((x.get("speedup") for x in best.sweep if x["batch_size"] == 1), None)
        if b1 is None:
            out.append(f"- batch-1 speedup of {best.label} >= {GOAL_SPEEDUP}x: not measured (no batch sweep)")
        else:
            falls = next(
                (
                    x["batch_size"]
                    for x in sorted(best.sweep, key=lambda x: x["batch_size"])
                    if (x.get("speedup") or 0) <= 1.0
                ),
                None,
            )
            first = min(x["batch_size"] for x in best.sweep)
            where = (
                "stays above 1.0x over the swept sizes"
                if falls is None
                else f"is at or below 1.0x from batch {falls}"
                if falls == first
                else f"falls to 1.0x at batch {falls}"
            )
            out.append(
                f"- batch-1 speedup of {best.label} >= {GOAL_SPEEDUP}x: {'met' if b1 >= GOAL_SPEEDUP else '**missed**'} "
                f"({b1:.2f}x; the curve {where})"
            )
    return out


def machine_line() -> str:
    """This machine in words (the comparison runs where the reports were made in bench/real_target.sh)."""
    import os

    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return (
        f"{platform.node() or 'host'}: {gpu or 'no GPU'}, {os.cpu_count()} CPU cores, {platform.platform()}"
    )


def build_document(
    specs: list[str], out_dir: str | Path, *, name: str = "results.md", commands: str | None = None,
    machine: str | None = None, title: str = "Results", notes: str | None = None,
) -> Path:  # fmt: skip
    """Write the results document and its plots into ``out_dir``; returns the document's path.

    ``notes`` (Markdown) is the one hand-written part: it follows the goals under its own heading, so that
    a reader can tell the generated figures from their interpretation."""
    reports = [load(s) for s in specs]
    if not reports:
        raise CompareError("give at least one report")
    targets = {r.report["target"] for r in reports}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(name).stem
    by_t: dict[float, list[LoadedReport]] = {}
    for r in reports:
        by_t.setdefault(r.temperature, []).append(r)
    p0 = reports[0].report["protocol"]
    lines = [
        f"# {title}",
        "",
        f"Generated by `deepspec eval --compare` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from "
        f"{len(reports)} evaluation report(s); every figure below is read from them.",
        "",
        f"- target: {', '.join(f'`{t}`' for t in sorted(targets))}",
        f"- machine: {machine or machine_line()}",
        f"- reports made: {', '.join(sorted({str(r.report.get('created', '?'))[:16] for r in reports}))}",
        f"- protocol: {p0.get('num_proposals')} proposals, max {p0.get('max_new_tokens')} new tokens, "
        f"thinking {'on' if p0.get('thinking') else 'off'}, first user turn only: {not p0.get('all_turns')}, "
        f"device {p0.get('device', '?')}",
    ]
    mismatch = {
        k
        for r in reports
        for k in ("num_proposals", "max_new_tokens", "thinking")
        if r.report["protocol"].get(k) != p0.get(k)
    }
    if mismatch:
        lines.append(
            f"- **warning**: the reports differ in {', '.join(sorted(mismatch))}: not a like-for-like comparison"
        )
    lines += ["", "## Goals", "", *goals(by_t)]
    if notes:
        lines += ["", "## What the figures say (written by hand; everything else here is generated)", "",
                  notes.strip()]  # fmt: skip
    for t, group in sorted(by_t.items()):
        tag = f"t{t:g}".replace(".", "_")
        lines += ["", f"## Accepted length, T = {t:g}", "", *tau_table(group)]
        acc = acceptance_table(group)
        if acc:
            png = plot_acceptance(group, out / f"{stem}_acceptance_{tag}.png")
            lines += [
                "",
                "Per-position conditional acceptance (all benchmarks pooled):",
                "",
                *acc,
                "",
                f"![conditional acceptance T={t:g}]({png.name})",
            ]
        if any(r.sweep for r in group):
            png = plot_speedup(group, out / f"{stem}_speedup_{tag}.png")
            lines += [
                "",
                f"### Speedup against batch size, T = {t:g}",
                "",
                *sweep_table(group),
                "",
                f"![speedup]({png.name})",
            ]
    # one row per training run (a draft's T=0 and T=1 reports share it)
    trained = {str(Path(r.report["checkpoint"]).parent): r for r in reports if r.training}
    if trained:
        png = plot_training(list(trained.values()), out / f"{stem}_training.png")
        lines += [
            "",
            "## Training",
            "",
            "Time is the sum of logged optimizer-step times (model loading and checkpoint writes excluded).",
            "",
            *training_table(list(trained.values())),
            "",
            f"![training curves]({png.name})",
        ]
        if any(r.selection for r in trained.values()):
            lines += [
                "",
                "### Checkpoint selection (measured accepted length on held-out prompts)",
                "",
                *selection_table(list(trained.values())),
            ]
    if commands:
        lines += ["", "## Commands", "", "```bash", commands.rstrip(), "```"]
    lines += ["", "## Reports", "", *[f"- {r.label} (T={r.temperature:g}): `{r.path}`" for r in reports], ""]
    doc = out / name
    atomic_write_text(doc, "\n".join(lines))
    return doc


def run_compare(
    specs: list[str],
    output: str | None,
    commands_file: str | None,
    machine: str | None,
    notes_file: str | None = None,
) -> int:
    """``deepspec eval --compare``: write the document, print its path."""
    commands = Path(commands_file).read_text(encoding="utf-8") if commands_file else None
    notes = Path(notes_file).read_text(encoding="utf-8") if notes_file else None
    try:
        doc = build_document(specs, output or ".", commands=commands, machine=machine, notes=notes)
    except CompareError as e:
        print(f"error: {e}")
        return 2
    print(doc.read_text(encoding="utf-8"))
    print(f"written: {doc}")
    return 0
