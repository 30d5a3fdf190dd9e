"""Output file names, sharding for Kubernetes Indexed Jobs, and the merge of shard outputs.

For an output ``dir/regen.jsonl`` the files beside it are::

    dir/regen.journal.jsonl            resume journal (append-only)
    dir/regen.errors.jsonl             bad input lines and failed records (line, id, reason)
    dir/regen.summary.json             counts, invariant, token stats, throughput
    dir/regen.shard-3-of-8.jsonl       output of shard 3 of 8 (with its own journal/errors/summary)

A shard ``i/n`` takes the records whose 0-based input index ``k`` has ``k % n == i``; the merge
interleaves the shard outputs back into input order and checks that every index is present once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepspec.regenerate.summary import account, invariant_line
from deepspec.storage import atomic_write_json, atomic_write_jsonl


class ShardError(ValueError):
    """A bad ``--shard`` value, a missing/incomplete shard, or an inconsistent merge."""


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ShardError(f"shard {self.index}/{self.count} is out of range: need 0 <= i < n")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def takes(self, k: int) -> bool:
        return k % self.count == self.index


def parse_shard(value: str) -> Shard:
    """``"3/8"`` -> Shard(3, 8)."""
    try:
        i, n = (int(p) for p in value.split("/"))
    except ValueError:
        raise ShardError(f"--shard {value!r}: expected I/N, e.g. 0/4") from None
    return Shard(i, n)


def shard_count_from_env(env: dict[str, str] | None = None) -> int | None:
    env = dict(os.environ if env is None else env)
    for name in ("DEEPSPEC_NUM_SHARDS", "JOB_COMPLETIONS"):
        if env.get(name):
            try:
                return int(env[name])
            except ValueError:
                raise ShardError(f"{name}={env[name]!r} is not an integer") from None
    return None


def shard_from_env(env: dict[str, str] | None = None) -> Shard | None:
    """The shard of a Kubernetes Indexed Job pod: JOB_COMPLETION_INDEX of DEEPSPEC_NUM_SHARDS/JOB_COMPLETIONS."""
    env = dict(os.environ if env is None else env)
    index = env.get("JOB_COMPLETION_INDEX")
    if index is None or index == "":
        return None
    count = shard_count_from_env(env)
    if count is None:
        raise ShardError(
            "JOB_COMPLETION_INDEX is set but the shard count is not: set DEEPSPEC_NUM_SHARDS (or JOB_COMPLETIONS) "
            "to the Job's completions, or pass --shard I/N"
        )
    try:
        return Shard(int(index), count)
    except ValueError:
        raise ShardError(f"JOB_COMPLETION_INDEX={index!r} is not an integer") from None


@dataclass(frozen=True)
class OutputPaths:
    """The output file and the files that sit beside it."""

    output: Path

    @property
    def base(self) -> str:
        name = self.output.name
        for suffix in (".jsonl", ".json"):
            if name.endswith(suffix):
                return str(self.output)[: -len(suffix)]
        return str(self.output)

    @property
    def journal(self) -> Path:
        return Path(self.base + ".journal.jsonl")

    @property
    def errors(self) -> Path:
        return Path(self.base + ".errors.jsonl")

    @property
    def summary(self) -> Path:
        return Path(self.base + ".summary.json")

    def shard(self, shard: Shard) -> OutputPaths:
        return OutputPaths(Path(f"{self.base}.shard-{shard.index}-of-{shard.count}.jsonl"))


def merge_shards(output: str | Path, count: int, *, quiet: bool = False) -> dict[str, Any]:
    """Merge ``<output>.shard-i-of-n.jsonl`` (i = 0..n-1) into ``output`` in input order.

    Every shard must be complete (its summary written at the end of its run). Returns the summary.
    """
    paths = OutputPaths(Path(output))
    shards = [paths.shard(Shard(i, count)) for i in range(count)]
    summaries = []
    for i, sp in enumerate(shards):
        if not sp.output.exists() or not sp.summary.exists():
            raise ShardError(
                f"shard {i}/{count} is missing or unfinished ({sp.output}); run "
                f"`deepspec regenerate --shard {i}/{count}` with the same settings, then merge again"
            )
        summaries.append(json.loads(sp.summary.read_text()))
    totals = {s.get("input_total") for s in summaries}
    if len(totals) != 1:
        raise ShardError(
            f"the shards were made from different inputs (record counts {sorted(map(str, totals))})"
        )
    n_total = int(totals.pop())
    files = [open(sp.output, encoding="utf-8") for sp in shards]  # noqa: SIM115 - closed below
    records: list[dict[str, Any]] = []

    def interleave() -> Any:
        for k in range(n_total):
            line = files[k % count].readline()
            if not line:
                raise ShardError(f"shard {k % count}/{count} ends before input record {k}; re-run that shard")
            r = json.loads(line)
            if r.get("index") != k:
                raise ShardError(f"shard {k % count}/{count}: expected record {k}, found {r.get('index')}")
            records.append({"status": r["status"], "train": r.get("train"), "usage": r.get("usage")})
            yield r
        for i, f in enumerate(files):
            if f.readline():
                raise ShardError(
                    f"shard {i}/{count} has more records than the input; re-run it with --restart"
                )

    try:
        atomic_write_jsonl(paths.output, interleave())
    finally:
        for f in files:
            f.close()
    errors = []
    for sp in shards:
        if sp.errors.exists():
            errors += [
                json.loads(line) for line in sp.errors.read_text(encoding="utf-8").splitlines() if line
            ]
    atomic_write_jsonl(paths.errors, sorted(errors, key=lambda e: e.get("index", 0)))
    summary = account(records, n_total)
    endpoints: dict[str, dict[str, Any]] = {}
    for s in summaries:
        for url, st in (s.get("endpoints") or {}).items():
            agg = endpoints.setdefault(url, {})
            for k, v in st.items():
                agg[k] = (agg.get(k, 0) + v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    summary.update(
        {
            "input_total": n_total,
            "shards": count,
            "output": str(paths.output),
            "errors_file": str(paths.errors),
            "retries": sum(s.get("retries", 0) for s in summaries),
            "requests": sum(s.get("requests", 0) for s in summaries),
            "wall_s": max(s.get("wall_s", 0.0) for s in summaries),
            "endpoints": endpoints,
            "model": summaries[0].get("model"),
        }
    )
    atomic_write_json(paths.summary, summary)
    if not quiet:
        print(f"merged {count} shards -> {paths.output}: {invariant_line(summary)}")
    return summary
