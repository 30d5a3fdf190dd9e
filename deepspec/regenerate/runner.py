"""Regenerate every assistant turn of a conversation file with the target, resumably.

:func:`regenerate` reads the input (bad lines become ``skipped`` records), takes this shard's
records, opens (or resumes) the journal, sends the unfinished records through the endpoint pool,
journals each record as soon as it is finished, and finally rewrites the output in input order from
the journal (temporary file + rename), writes the error file and the summary.

Output line (one per input record, in input order)::

    {"id", "index", "line", "status": "ok"|"truncated"|"error"|"skipped", "train": bool,
     "messages": [...], "finish_reasons": [...], "usage": {"prompt_tokens", "completion_tokens"},
     "retries", "error", "provenance": {"model", "revision", "sampling", "chat_template_kwargs",
     "endpoints"}, "meta": {other input fields}}

``train`` is False for ``error``/``skipped`` and for ``truncated`` under the ``drop`` policy.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

from deepspec.data.conversations import BadRecord
from deepspec.data.template import template_kwargs
from deepspec.regenerate import workers
from deepspec.regenerate.endpoints import EndpointPool
from deepspec.regenerate.job import RegenerationError, RegenerationJob, file_sha256, load_items
from deepspec.regenerate.journal import JournalMismatch, JournalWriter, check_fingerprint, load_journal
from deepspec.regenerate.send import install_uvloop, open_pool, send_records
from deepspec.regenerate.shards import ShardError
from deepspec.regenerate.summary import account, invariant_line
from deepspec.storage import atomic_write_json, atomic_write_jsonl

__all__ = ["RegenerationError", "RegenerationJob", "regenerate"]

log = logging.getLogger("deepspec.regenerate")
PROGRESS_INTERVAL_S = 0.25


def skipped_record(index: int, bad: BadRecord) -> dict[str, Any]:
    return {
        "id": f"line-{bad.line}",
        "index": index,
        "line": bad.line,
        "status": "skipped",
        "train": False,
        "messages": [],
        "error": bad.reason,
    }


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


class _Progress:
    """tqdm bar with records/s (tqdm's rate), tokens/s and ETA; quiet when disabled.

    Redrawn at most every :data:`PROGRESS_INTERVAL_S` (updating tqdm per record costs CPU at
    thousands of records per second).
    """

    def __init__(self, total: int, initial: int, enabled: bool, desc: str) -> None:
        self.bar = None
        self.records = 0  # finished in this run
        self.tokens = 0
        self._shown = 0
        self._next = 0.0
        self.t0 = time.perf_counter()
        if enabled:
            from tqdm import tqdm

            tty = sys.stderr.isatty()
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="rec",
                mininterval=PROGRESS_INTERVAL_S if tty else 15.0,
                dynamic_ncols=True,
            )

    def update(self, record: dict[str, Any]) -> None:
        self.set(self.records + 1, self.tokens + (record.get("usage") or {}).get("completion_tokens", 0))

    def set(self, records: int, tokens: int) -> None:
        """Totals finished in this run so far (a parent sums its workers' reports)."""
        self.records, self.tokens = records, tokens
        if self.bar is not None and (now := time.perf_counter()) >= self._next:
            self._refresh(now)

    def _refresh(self, now: float) -> None:
        assert self.bar is not None
        self.bar.update(self.records - self._shown)
        self._shown = self.records
        self.bar.set_postfix_str(f"{self.tokens / max(now - self.t0, 1e-9):,.0f} tok/s", refresh=False)
        self._next = now + PROGRESS_INTERVAL_S

    def close(self) -> None:
        if self.bar is not None:
            self._refresh(time.perf_counter())
            self.bar.close()


def _fingerprint(job: RegenerationJob, input_sha: str, n_total: int) -> dict[str, Any]:
    s = job.settings
    return {
        "input_sha256": input_sha,
        "input_records": n_total,
        "format": job.data_format,
        "limit": job.limit,
        "shard": str(job.shard) if job.shard else None,
        "model": job.model,
        "sampling": s.sampling.model_dump(),
        "chat_template_kwargs": template_kwargs(s),
        "truncated_policy": s.truncated,
        "max_prompt_chars": job.max_prompt_chars,
    }


def regenerate(job: RegenerationJob) -> dict[str, Any]:
    """Run (or resume) a regeneration; returns the summary (also written beside the output)."""
    install_uvloop()
    return asyncio.run(_regenerate(job))


async def _regenerate(job: RegenerationJob) -> dict[str, Any]:
    t0 = time.perf_counter()
    paths = job.paths
    paths.output.parent.mkdir(parents=True, exist_ok=True)

    items, mine = load_items(job)
    n_total = len(items)
    fingerprint = _fingerprint(job, file_sha256(job.input_path), n_total)

    if job.restart:
        for p in (paths.journal, paths.output, paths.errors, paths.summary, *workers.worker_journals(paths)):
            p.unlink(missing_ok=True)
    header, done = load_journal(paths.journal)
    if header is not None:
        try:
            check_fingerprint(paths.journal, header.get("fingerprint", {}), fingerprint)
        except JournalMismatch as e:
            raise RegenerationError(str(e)) from None
    mine_set = set(mine)
    done = {k: r for k, r in done.items() if k in mine_set}

    writer = JournalWriter(paths.journal, fingerprint)
    pool: EndpointPool | None = None
    stats = workers.RunStats()
    progress: _Progress | None = None
    model = job.model or ""
    try:
        # Records finished by the workers of an interrupted run: into this journal, then forgotten.
        workers.fold(paths, fingerprint, mine_set, done, writer)
        resumed = len(done)
        if resumed:
            log.info("resuming from %s: %d of %d records already done", paths.journal, resumed, len(mine))
        progress = _Progress(
            len(mine), resumed, job.progress, f"regenerate{' ' + str(job.shard) if job.shard else ''}"
        )
        for k in mine:  # bad input needs no request
            item = items[k]
            if k not in done and isinstance(item, BadRecord):
                done[k] = skipped_record(k, item)
                writer.append(done[k])
                progress.update(done[k])
        todo = [] if job.partial else [k for k in mine if k not in done]
        n_workers = workers.effective_workers(job, len(todo))
        if todo and n_workers > 1:
            try:
                await workers.run_workers(job, paths, fingerprint, todo, n_workers, progress, stats)
            finally:  # also after a failed worker: what the others finished is kept
                workers.fold(paths, fingerprint, mine_set, done, writer)
        elif todo:
            pool, model = await open_pool(job, job.settings.concurrency)

            def finished(rec: dict[str, Any]) -> None:
                done[rec["index"]] = rec
                writer.append(rec)
                assert progress is not None
                progress.update(rec)

            cpu0, start = time.process_time(), time.time()
            await send_records(todo, items, pool, job, model, finished)
            stats.add_timing(time.process_time() - cpu0, start, time.time())
            stats.add_pool(pool)
    finally:
        if progress is not None:
            progress.close()
        writer.close()
        if pool is not None:
            await pool.close()

    missing = [k for k in mine if k not in done]
    if missing and not job.partial:
        raise ShardError(
            f"{len(missing)} records were not finished (first index {missing[0]}); re-run to resume"
        )
    # A partial output holds the finished records only (in input order); the journal stays, so running
    # the same command without --partial later finishes the rest and rewrites the output in full.
    ordered = [done[k] for k in mine if k in done]
    atomic_write_jsonl(paths.output, ordered)
    errors = [
        {"index": r["index"], "line": r["line"], "id": r["id"], "status": r["status"], "reason": r["error"]}
        for r in ordered
        if r["status"] in ("skipped", "error")
    ]
    atomic_write_jsonl(paths.errors, errors)

    wall = time.perf_counter() - t0
    sent = len(ordered) - resumed  # a partial output sends nothing: ordered is what the journal held
    summary = account(ordered, len(ordered))
    summary.update(
        {
            "partial": bool(missing),
            "unfinished": len(missing),
            "input_total": n_total,
            "shard": str(job.shard) if job.shard else None,
            "input_path": job.input_path,
            "output": str(paths.output),
            "errors_file": str(paths.errors),
            "model": model or next((r["provenance"]["model"] for r in ordered if "provenance" in r), None),
            "revision": job.revision,
            "resumed_from_journal": resumed,
            "finished_this_run": sent,
            "wall_s": round(wall, 3),
            "records_per_s": round(sent / wall, 2) if wall else 0.0,
            "tokens_per_s": round(progress.tokens / wall, 1) if wall else 0.0,
            **stats.summary(),  # requests, retries, endpoints, workers, send-phase rate and CPU
        }
    )
    atomic_write_json(paths.summary, summary)
    if job.progress:
        print(f"{paths.output}: {invariant_line(summary)}", file=sys.stderr)
    if missing:
        log.warning(
            "partial output: %d of %d records (%d unfinished); run without --partial to finish them",
            len(ordered), len(mine), len(missing),
        )  # fmt: skip
    return summary
