"""Batched evaluation: benchmark prompts decoded ``B`` rows at a time, and the sweep over batch sizes.

``deepspec eval --batch-size 1,8,32`` evaluates the suite once per batch size with
:meth:`SpeculativeEngine.generate_batch` (per-row acceptance) and the baseline with
:meth:`SpeculativeEngine.generate_plain_batch` on the same decode core, both in ``B`` cache rows that
are refilled with the next waiting prompt as soon as their prompt ends, so the speedup at each size
compares like with like and no row idles until the longest answer of a fixed batch ends. Accepted
lengths do not depend on the batch size (each prompt is decoded exactly as when alone: same tokens at
T = 0, same random stream per prompt at T > 0); tokens/s and speedup do, and the sweep shows whether
speculation still pays at a given load.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepspec.data.template import render_prompt
from deepspec.eval.engine import RoundRecord, SpeculativeEngine, prompt_generator
from deepspec.eval.metrics import AcceptanceStats

if TYPE_CHECKING:
    from deepspec.eval.benchmarks import BenchmarkPrompt
    from deepspec.eval.runner import Results, RunSettings
    from deepspec.models.base import SpeculativeDrafter


def drafter_factory(drafter: SpeculativeDrafter | None) -> Callable[[], SpeculativeDrafter] | None:
    """More drafters like ``drafter`` (one per batch row): the same model, fresh per-sequence state."""
    from deepspec.eval.drafters import NGramDrafter

    if isinstance(drafter, NGramDrafter):
        return lambda: NGramDrafter(drafter.vocab_size, drafter.max_ngram, drafter.min_ngram)
    model = getattr(drafter, "model", None)
    if model is not None and callable(getattr(model, "as_drafter", None)):
        return model.as_drafter
    return None


def evaluate_batched(
    engine: SpeculativeEngine,
    tokenizer: Any,
    benchmarks: dict[str, list[BenchmarkPrompt]],
    settings: RunSettings,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
) -> tuple[Results, list[tuple[str, int, RoundRecord]]]:
    """This rank's share of every benchmark, decoded in ``batch_size`` rows (turn by turn).

    The prompts of all benchmarks are pooled, so the rows stay full even when a benchmark has fewer
    prompts than rows (the sweep's large sizes); turn ``k`` of every prompt that has one is one
    refilled batch (:meth:`SpeculativeEngine.generate_batch` with ``rows=batch_size``: a row takes the
    next prompt as soon as its answer ends), spec then plain; each prompt's counters go to its own
    benchmark."""
    pool = [p for prompts in benchmarks.values() for p in prompts if p.index % world == rank]
    results: Results = {
        name: (AcceptanceStats(), AcceptanceStats() if settings.baseline else None) for name in benchmarks
    }
    records: list[tuple[str, int, RoundRecord]] = []
    if not pool:
        return results, records
    turns = [p.turns if settings.all_turns else p.turns[:1] for p in pool]
    device = engine.device
    gen_spec = [prompt_generator(settings.seed, p.benchmark, p.index, device) for p in pool]
    gen_base = [prompt_generator(settings.seed, p.benchmark, p.index, device) for p in pool]
    messages: list[list[dict[str, str]]] = [[] for _ in pool]
    for p in pool:
        spec_all, base_all = results[p.benchmark]
        spec_all.prompts += 1
        if base_all is not None:
            base_all.prompts += 1
    for k in range(max(len(t) for t in turns)):
        rows = [i for i in range(len(pool)) if k < len(turns[i])]
        for i in rows:
            messages[i].append({"role": "user", "content": turns[i][k]})
        ids = [render_prompt(tokenizer, messages[i], settings.template_kwargs) for i in rows]
        outs = engine.generate_batch(ids, [gen_spec[i] for i in rows], rows=batch_size)
        if settings.baseline:
            plain = engine.generate_plain_batch(ids, [gen_base[i] for i in rows], rows=batch_size)
            for i, out in zip(rows, plain, strict=True):
                base_all = results[pool[i].benchmark][1]
                if base_all is not None:
                    base_all += _counters(out.stats)  # AcceptanceStats adds in place
        for i, out in zip(rows, outs, strict=True):
            spec_all = results[pool[i].benchmark][0]
            spec_all += _counters(out.stats)
            records.extend((pool[i].benchmark, pool[i].index, r) for r in out.rounds)
            answer = tokenizer.decode(out.tokens, skip_special_tokens=True)
            messages[i].append({"role": "assistant", "content": answer})
    return results, records


def sweep_subset(
    benchmarks: dict[str, list[BenchmarkPrompt]], limit: int | None
) -> dict[str, list[BenchmarkPrompt]]:
    """The first ``limit`` prompts taken round-robin across the benchmarks (all of them when ``limit`` is
    None or not smaller), so that a capped sweep still covers every benchmark."""
    total = sum(len(v) for v in benchmarks.values())
    if limit is None or limit >= total:
        return benchmarks
    picked: dict[str, list[BenchmarkPrompt]] = {name: [] for name in benchmarks}
    depth, left = 0, limit
    while left:
        for name, prompts in benchmarks.items():
            if left and depth < len(prompts):
                picked[name].append(prompts[depth])
                left -= 1
        depth += 1
    return {name: prompts for name, prompts in picked.items() if prompts}


def _counters(stats: AcceptanceStats) -> AcceptanceStats:
    stats.prompts = 0  # counted once per prompt by the caller, not once per turn
    return stats


def sweep_row(batch_size: int, results: Results) -> dict[str, Any]:
    """Macro accepted length and micro tokens/s and speedup of one batch size."""
    spec, base = AcceptanceStats(), AcceptanceStats()
    for s, b in results.values():
        spec += s
        if b is not None:
            base += b
    taus = [s.tau for s, _ in results.values() if s.rounds]
    row: dict[str, Any] = {
        "batch_size": batch_size,
        "accept_length": round(sum(taus) / len(taus), 4) if taus else None,
        "spec_tokens_per_s": round(spec.tokens_per_second, 2),
    }
    if base.rounds:
        row["plain_tokens_per_s"] = round(base.tokens_per_second, 2)
        row["speedup"] = (
            round(spec.tokens_per_second / base.tokens_per_second, 4) if base.tokens_per_second else None
        )
    return row


def batch_sweep(
    engine: SpeculativeEngine,
    tokenizer: Any,
    benchmarks: dict[str, list[BenchmarkPrompt]],
    settings: RunSettings,
    sizes: list[int],
    first: Results,
    out: Path,
    max_prompts: int | None = None,
) -> str:
    """Evaluate every size (``first`` holds the results at ``sizes[0]`` on all prompts); write
    ``batch_sweep.json`` and ``speedup_vs_batch.png``. Returns the Markdown section (also appended to
    ``report.md``). With ``max_prompts`` every size, the first one too, decodes the same
    :func:`sweep_subset` (batch 1 over the whole suite can take longer than the rest together)."""
    subset = sweep_subset(benchmarks, max_prompts)
    rows = [] if subset is not benchmarks else [sweep_row(sizes[0], first)]
    for b in sizes[len(rows) :]:
        results, _ = evaluate_batched(engine, tokenizer, subset, settings, b)
        rows.append(sweep_row(b, results))
    n_prompts = sum(len(v) for v in subset.values())
    for r in rows:
        r["prompts"] = n_prompts
    (out / "batch_sweep.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n", encoding="utf-8")
    plot_speedup(rows, out / "speedup_vs_batch.png")
    lines = [
        "",
        "## Speedup against batch size",
        "",
        f"{n_prompts} prompts at every batch size (taken round-robin across the benchmarks).",
        "",
        "| batch size | accepted length | spec tokens/s | plain tokens/s | speedup |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['accept_length']} | {r['spec_tokens_per_s']} | "
            f"{r.get('plain_tokens_per_s', '-')} | {r.get('speedup', '-')} |"
        )
    lines += ["", "![speedup against batch size](speedup_vs_batch.png)", ""]
    section = "\n".join(lines)
    with open(out / "report.md", "a", encoding="utf-8") as f:
        f.write(section)
    return section


def plot_speedup(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    sizes = [r["batch_size"] for r in rows]
    ax.plot(sizes, [r.get("speedup") or 0.0 for r in rows], marker="o")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size (prompts decoded together)")
    ax.set_ylabel("speedup over plain decoding")
    ax.set_title("speculative decoding speedup against load")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
