"""Running the engine over benchmark prompts: turns, baseline, process sharding.

Prompts are rendered by the one chat-template rule of :mod:`deepspec.data.template` (the same token
ids the embedded server and the training loss masks use).

Sharding: rank ``r`` of ``world`` takes prompts ``i % world == r`` (per benchmark); each prompt has its
own generator seeded from (seed, benchmark, index), so the merged counters do not depend on the
number of processes. Ranks write their raw counters to ``<out>/parts/rank<r>.json``; rank 0 merges.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepspec.data.template import render_prompt
from deepspec.eval.benchmarks import BenchmarkPrompt
from deepspec.eval.engine import RoundRecord, SpeculativeEngine, prompt_generator
from deepspec.eval.metrics import AcceptanceStats
from deepspec.storage import atomic_write_json

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")

Results = dict[str, tuple[AcceptanceStats, AcceptanceStats | None]]


@dataclass
class RunSettings:
    seed: int = 0
    all_turns: bool = False
    # chat-template kwargs (deepspec.data.template.template_kwargs: the recipe's, thinking from evaluation)
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    baseline: bool = True  # also run the target alone on the same prompts (tokens/s, speedup)
    progress: bool = True


def stop_token_ids(tokenizer: Any, model_config: Any = None) -> tuple[int, ...]:
    """EOS ids of the tokenizer / model config plus the chat template's end-of-turn tokens."""
    ids: set[int] = set()

    def add(x: Any) -> None:
        if isinstance(x, int) and x >= 0:
            ids.add(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                add(y)

    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        for tok in END_OF_TURN_TOKENS:
            if tok in vocab:
                add(vocab[tok])
    if model_config is not None:
        add(getattr(model_config, "eos_token_id", None))
        gen = getattr(model_config, "generation_config", None)
        if gen is not None:
            add(getattr(gen, "eos_token_id", None))
    return tuple(sorted(ids))


def run_prompt(
    engine: SpeculativeEngine, tokenizer: Any, prompt: BenchmarkPrompt, settings: RunSettings
) -> tuple[AcceptanceStats, AcceptanceStats | None, list[RoundRecord]]:
    """Speculative (and optionally plain) decoding of one benchmark prompt, all turns if asked."""
    turns = prompt.turns if settings.all_turns else prompt.turns[:1]
    spec = AcceptanceStats()
    base = AcceptanceStats() if settings.baseline else None
    records: list[RoundRecord] = []
    gen_spec = prompt_generator(settings.seed, prompt.benchmark, prompt.index, engine.device)
    gen_base = prompt_generator(settings.seed, prompt.benchmark, prompt.index, engine.device)
    messages: list[dict[str, str]] = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        ids = render_prompt(tokenizer, messages, settings.template_kwargs)
        out = engine.generate(ids, gen_spec)
        spec += out.stats
        records.extend(out.rounds)
        if base is not None:
            base += engine.generate_plain(ids, gen_base).stats
        # the target's own answer feeds the next turn (lossless: it is a target sample)
        answer = tokenizer.decode(out.tokens, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
    spec.prompts = 1
    if base is not None:
        base.prompts = 1
    return spec, base, records


def evaluate_benchmarks(
    engine: SpeculativeEngine,
    tokenizer: Any,
    benchmarks: dict[str, list[BenchmarkPrompt]],
    settings: RunSettings,
    rank: int = 0,
    world: int = 1,
) -> tuple[Results, list[tuple[str, int, RoundRecord]]]:
    """This rank's share of every benchmark; also the per-round records (calibration data)."""
    from tqdm import tqdm

    results: Results = {}
    records: list[tuple[str, int, RoundRecord]] = []
    total = sum(len([p for p in ps if p.index % world == rank]) for ps in benchmarks.values())
    bar = tqdm(
        total=total, desc=f"eval rank {rank}", disable=not settings.progress or rank != 0, unit="prompt"
    )
    for name, prompts in benchmarks.items():
        spec_all = AcceptanceStats()
        base_all = AcceptanceStats() if settings.baseline else None
        for p in prompts:
            if p.index % world != rank:
                continue
            spec, base, recs = run_prompt(engine, tokenizer, p, settings)
            spec_all += spec
            if base_all is not None and base is not None:
                base_all += base
            records.extend((name, p.index, r) for r in recs)
            bar.update(1)
            bar.set_postfix(bench=name, tau=f"{spec_all.tau:.2f}")
        results[name] = (spec_all, base_all)
    bar.close()
    return results, records


# ------------------------------------------------------------------------------ rank files


def results_to_json(results: Results) -> dict[str, Any]:
    return {
        n: {"spec": s.to_dict(), "base": b.to_dict() if b is not None else None}
        for n, (s, b) in results.items()
    }


def results_from_json(d: dict[str, Any]) -> Results:
    return {
        n: (AcceptanceStats.from_dict(v["spec"]), AcceptanceStats.from_dict(v["base"]) if v["base"] else None)
        for n, v in d.items()
    }


def write_rank_file(
    results: Results, records: Sequence[tuple[str, int, RoundRecord]], out_dir: Path, rank: int
) -> Path:
    parts = out_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    path = parts / f"rank{rank}.json"
    payload = {
        "results": results_to_json(results),
        "records": [[b, i, r.proposed, r.accepted, r.confidence, r.raw_proposed] for b, i, r in records],
    }
    return atomic_write_json(path, payload, indent=None)


def merge_rank_files(out_dir: Path, world: int) -> tuple[Results, list[tuple[str, int, RoundRecord]]]:
    """Sum the counters of ``rank0..rank{world-1}.json`` (benchmark order of rank 0 kept)."""
    merged: Results = {}
    records: list[tuple[str, int, RoundRecord]] = []
    for r in range(world):
        path = out_dir / "parts" / f"rank{r}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: rank {r} did not finish its share")
        payload = json.loads(path.read_text(encoding="utf-8"))
        for name, (spec, base) in results_from_json(payload["results"]).items():
            if name not in merged:
                merged[name] = (AcceptanceStats(), AcceptanceStats() if base is not None else None)
            ms, mb = merged[name]
            ms += spec
            if mb is not None and base is not None:
                mb += base
        records.extend((b, i, RoundRecord(p, a, c, rp)) for b, i, p, a, c, rp in payload["records"])
    records.sort(key=lambda x: (x[0], x[1]))
    return merged, records
