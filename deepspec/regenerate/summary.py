"""Accounting and statistics of a regeneration run (``<output>.summary.json``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

STATUSES = ("ok", "truncated", "error", "skipped")
INVARIANT = "ok + truncated + error + skipped == input"


class AccountingError(RuntimeError):
    """The output does not account for every input record (a bug, never bad input)."""


def token_stats(values: list[int]) -> dict[str, float]:
    """mean / p50 / p95 / total of a list of token counts (nearest-rank percentiles)."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "total": 0}
    s = sorted(values)

    def pct(p: float) -> float:
        return float(s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))])

    return {"mean": round(sum(s) / len(s), 2), "p50": pct(50), "p95": pct(95), "total": int(sum(s))}


def account(records: list[dict[str, Any]] | Any, n_input: int) -> dict[str, Any]:
    """Counts per status, training records and token statistics; checks the invariant."""
    counts: Counter[str] = Counter()
    prompt: list[int] = []
    completion: list[int] = []
    train = 0
    for r in records:
        counts[r["status"]] += 1
        train += bool(r.get("train"))
        if r["status"] in ("ok", "truncated"):
            usage = r.get("usage") or {}
            prompt.append(int(usage.get("prompt_tokens", 0)))
            completion.append(int(usage.get("completion_tokens", 0)))
    counts_out = {s: counts.get(s, 0) for s in STATUSES}
    total = sum(counts_out.values())
    holds = total == n_input and sum(counts.values()) == total
    if not holds:
        raise AccountingError(
            f"accounting invariant broken: {INVARIANT} gives {total} != {n_input} ({dict(counts)})"
        )
    return {
        "input": n_input,
        **counts_out,
        "invariant": INVARIANT,
        "invariant_holds": holds,
        "train_records": train,
        "excluded_from_training": n_input - train,
        "prompt_tokens": token_stats(prompt),
        "completion_tokens": token_stats(completion),
    }


def invariant_line(s: dict[str, Any]) -> str:
    return (
        f"ok {s['ok']} + truncated {s['truncated']} + error {s['error']} + skipped {s['skipped']} "
        f"== input {s['input']}: {'holds' if s['invariant_holds'] else 'BROKEN'}"
    )
