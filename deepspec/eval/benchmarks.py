"""Benchmark prompt sets: a directory of ``{"turns": [str, ...]}`` JSONL files, one per benchmark.

Selection follows the reference protocol: each file is shuffled with ``shuffle_seed`` and capped
(``EvaluationConfig.caps[stem]``, then the global ``max_prompts``). The prompt index recorded is the
position *after* shuffling and capping, which seeds that prompt's sampler, so any process count
evaluates exactly the same (prompt, seed) pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deepspec.data.conversations import BadRecord, read_conversations

if TYPE_CHECKING:
    from deepspec.config import EvaluationConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


class BenchmarkError(ValueError):
    """A benchmark directory or file cannot be used; the message says what to do."""


@dataclass
class BenchmarkPrompt:
    benchmark: str
    index: int  # position after shuffle + cap (seeds the prompt's sampler)
    turns: list[str]  # user turns, in order
    line: int  # 1-based line in the source file


def resolve_benchmarks_dir(path: str | Path) -> Path:
    """Absolute path as is; a relative one against the working directory, then the repository root
    (so ``../shared/datasets/eval`` finds the ``shared/`` folder beside the checkout)."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise BenchmarkError(
        f"benchmark directory {path} not found (tried {tried}); set evaluation.benchmarks_dir or build the "
        "files with `deepspec benchmarks fetch --out DIR`"
    )


def read_benchmark_file(path: Path, name: str | None = None) -> tuple[list[BenchmarkPrompt], list[BadRecord]]:
    """All prompts of one file (unshuffled) and the lines that could not be read."""
    name = name or path.stem
    prompts: list[BenchmarkPrompt] = []
    bad: list[BadRecord] = []
    for rec in read_conversations(path, fmt="turns"):
        if isinstance(rec, BadRecord):
            bad.append(rec)
            continue
        turns = [m["content"] for m in rec.messages if m["role"] == "user"]
        if not turns:
            bad.append(BadRecord(rec.line, "no user turn"))
            continue
        prompts.append(BenchmarkPrompt(name, -1, turns, rec.line))
    return prompts, bad


def select_prompts(prompts: list[BenchmarkPrompt], cap: int | None, seed: int) -> list[BenchmarkPrompt]:
    order = list(prompts)
    random.Random(seed).shuffle(order)
    if cap is not None:
        order = order[:cap]
    return [BenchmarkPrompt(p.benchmark, i, p.turns, p.line) for i, p in enumerate(order)]


def load_benchmarks(
    cfg: EvaluationConfig, benchmarks_dir: str | Path | None = None
) -> dict[str, list[BenchmarkPrompt]]:
    """The selected prompts of every benchmark in ``cfg.benchmarks`` (order kept)."""
    root = resolve_benchmarks_dir(benchmarks_dir or cfg.benchmarks_dir)
    available = sorted(p.stem for p in root.glob("*.jsonl"))
    out: dict[str, list[BenchmarkPrompt]] = {}
    for name in cfg.benchmarks:
        path = root / f"{name}.jsonl"
        if not path.is_file():
            raise BenchmarkError(
                f"benchmark {name!r}: {path} not found; available in {root}: {', '.join(available) or 'none'} "
                "(edit evaluation.benchmarks)"
            )
        prompts, bad = read_benchmark_file(path, name)
        if bad:
            first = bad[0]
            print(
                f"warning: {path}: {len(bad)} unreadable line(s) skipped (first: line {first.line}: {first.reason})"
            )
        if not prompts:
            raise BenchmarkError(f'benchmark {name!r}: {path} holds no usable {{"turns": [...]}} record')
        caps = [c for c in (cfg.caps.get(name), cfg.max_prompts) if c is not None]
        out[name] = select_prompts(prompts, min(caps) if caps else None, cfg.shuffle_seed)
    return out
