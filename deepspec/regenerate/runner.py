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
import hashlib
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from deepspec.config import RegenerationConfig
from deepspec.data.conversations import BadRecord, Conversation, Format, read_conversations
from deepspec.regenerate.endpoints import EndpointPool, NoHealthyEndpoint
from deepspec.regenerate.journal import JournalMismatch, JournalWriter, check_fingerprint, load_journal
from deepspec.regenerate.plan import generation_points, history_message, is_dropped
from deepspec.regenerate.shards import OutputPaths, Shard, ShardError, write_jsonl_atomic
from deepspec.regenerate.summary import account, invariant_line, write_json_atomic

log = logging.getLogger("deepspec.regenerate")
PROGRESS_INTERVAL_S = 0.25


class RegenerationError(RuntimeError):
    """A run cannot start or finish; the message says what to do."""


@dataclass
class RegenerationJob:
    """Everything one run needs (the CLI builds it from the recipe and the flags)."""

    input_path: str
    output_path: str
    endpoints: list[str]
    settings: RegenerationConfig = field(default_factory=RegenerationConfig)
    model: str | None = None  # served model name; None = the first id of /v1/models
    revision: str | None = None
    data_format: Format = "auto"
    limit: int | None = None
    shard: Shard | None = None
    restart: bool = False
    progress: bool = True
    max_prompt_chars: int | None = None  # longer prompts are skipped (the CLI uses 16 x data.max_length)
    workers: int = 1  # client processes (see deepspec.regenerate.workers); 1 = this process only


# --------------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_input(path: str, fmt: Format, limit: int | None) -> list[Conversation | BadRecord]:
    """All input records (bad ones included), up to ``limit``."""
    if "://" in path:
        raise RegenerationError(f"input {path}: only local files are supported by regenerate for now")
    if not Path(path).is_file():
        raise RegenerationError(f"input file not found: {path} (set data.path or pass --input)")
    items: list[Conversation | BadRecord] = []
    for item in read_conversations(path, fmt):
        if limit is not None and len(items) >= limit:
            break
        items.append(item)
    return items


def oversized(conv: Conversation, max_chars: int | None) -> BadRecord | None:
    """A conversation whose kept text is too long to be a useful training record."""
    if max_chars is None:
        return None
    n = sum(len(str(m.get("content") or "")) for m in conv.messages if m.get("role") != "assistant")
    if n <= max_chars:
        return None
    return BadRecord(
        conv.line,
        f"record {conv.id!r}: prompt text is {n:,} characters, more than {max_chars:,} "
        "(16 x data.max_length); raise data.max_length or remove the record",
    )


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------


def sampling_params(s: RegenerationConfig, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(standard OpenAI parameters, extra_body) for the record at ``index``."""
    sp = s.sampling
    params: dict[str, Any] = {"temperature": sp.temperature, "top_p": sp.top_p, "max_tokens": sp.max_tokens}
    if sp.seed is not None:
        params["seed"] = sp.seed + index
    extra: dict[str, Any] = {}
    if sp.top_k is not None:
        extra["top_k"] = sp.top_k
    if sp.min_p is not None:
        extra["min_p"] = sp.min_p
    kwargs = template_kwargs(s)
    if kwargs:
        extra["chat_template_kwargs"] = kwargs
    return params, extra


def template_kwargs(s: RegenerationConfig) -> dict[str, Any]:
    kwargs = dict(s.chat_template_kwargs)
    if s.thinking is not None:
        kwargs["enable_thinking"] = s.thinking
    return kwargs


def provenance(s: RegenerationConfig, model: str, revision: str | None) -> dict[str, Any]:
    return {
        "model": model,
        "revision": revision,
        "sampling": s.sampling.model_dump(),
        "chat_template_kwargs": template_kwargs(s),
    }


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


async def regenerate_conversation(
    conv: Conversation,
    index: int,
    pool: EndpointPool,
    s: RegenerationConfig,
    model: str,
    prov: dict[str, Any],
) -> dict[str, Any]:
    """Regenerate every assistant turn of one conversation, turn after turn, with regenerated history."""
    params, extra = sampling_params(s, index)
    points = set(generation_points(conv.messages))
    history: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    finish: list[str | None] = []
    endpoints: list[str] = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    retries = 0
    error: str | None = None
    turn = 0
    for j, m in enumerate(conv.messages):
        if is_dropped(m):
            continue
        history.append(history_message(m))
        out.append(m)
        if j not in points:
            continue
        turn += 1
        c = await pool.complete(
            history, key=f"{conv.id}#{turn}", model=model, params=params, extra_body=extra
        )
        retries += c.retries
        if c.error is not None or c.message is None:
            error = f"turn {turn}: {c.error}"
            break
        usage["prompt_tokens"] += c.prompt_tokens
        usage["completion_tokens"] += c.completion_tokens
        finish.append(c.finish_reason)
        if c.endpoint and c.endpoint not in endpoints:
            endpoints.append(c.endpoint)
        out.append(c.message)
        history.append(history_message(c.message))
    if error is not None:
        status = "error"
    elif "length" in finish:
        status = "truncated"
    else:
        status = "ok"
    train = status == "ok" or (status == "truncated" and s.truncated == "keep")
    return {
        "id": conv.id,
        "index": index,
        "line": conv.line,
        "status": status,
        "train": train,
        "messages": out,
        "finish_reasons": finish,
        "usage": usage,
        "turns": turn,
        "retries": retries,
        "error": error,
        "provenance": {**prov, "endpoints": endpoints},
        "meta": conv.meta,
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


def load_items(job: RegenerationJob) -> tuple[list[Conversation | BadRecord], list[int]]:
    """All input records (over-long ones turned into bad records) and this shard's indices."""
    items = read_input(job.input_path, job.data_format, job.limit)
    for k, item in enumerate(items):
        if isinstance(item, Conversation) and (bad := oversized(item, job.max_prompt_chars)):
            items[k] = bad
    mine = [k for k in range(len(items)) if job.shard is None or job.shard.takes(k)]
    return items, mine


async def open_pool(job: RegenerationJob, concurrency: int) -> tuple[EndpointPool, str]:
    """Open and probe the endpoints; returns the pool and the model name to request."""
    s = job.settings
    pool = EndpointPool(
        job.endpoints,
        concurrency=concurrency,
        api_key=s.api_key,
        request_timeout_s=s.request_timeout_s,
        max_retries=s.max_retries,
        backoff_initial_s=s.backoff_initial_s,
        backoff_max_s=s.backoff_max_s,
    )
    try:
        await pool.start()
    except NoHealthyEndpoint as e:
        await pool.close()
        raise RegenerationError(str(e)) from None
    model = job.model or pool.served_model() or ""
    if not model:
        await pool.close()
        raise RegenerationError("no model name: set target.served_model_name (the server lists no model)")
    return pool, model


class WorkSource(Protocol):
    """Input indices handed out one at a time (``workers.WorkFromParent`` in a worker process)."""

    async def take(self) -> int | None: ...


async def send_records(
    todo: list[int] | WorkSource,
    items: list[Conversation | BadRecord],
    pool: EndpointPool,
    job: RegenerationJob,
    model: str,
    on_record: Any,
) -> None:
    """Regenerate the conversations at ``todo`` with up to the pool's concurrency in flight.

    ``todo`` is a list of input indices, or a :class:`WorkSource` (a worker process gets its records
    from the parent that way).
    ``on_record(record)`` is called as each one finishes (it journals it).
    """
    prov = provenance(job.settings, model, job.revision)
    if isinstance(todo, list):
        it = iter(todo)
        lanes = min(len(todo), pool.total_concurrency)

        async def take() -> int | None:
            return next(it, None)  # lanes share one iterator: each index is taken once
    else:
        take, lanes = todo.take, pool.total_concurrency

    async def lane() -> None:
        while (k := await take()) is not None:
            conv = items[k]
            assert isinstance(conv, Conversation)
            on_record(await regenerate_conversation(conv, k, pool, job.settings, model, prov))

    await asyncio.gather(*(lane() for _ in range(lanes)))


def _install_uvloop() -> None:
    """Use uvloop's event loop when it is installed (less CPU per request)."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def regenerate(job: RegenerationJob) -> dict[str, Any]:
    """Run (or resume) a regeneration; returns the summary (also written beside the output)."""
    _install_uvloop()
    return asyncio.run(_regenerate(job))


async def _regenerate(job: RegenerationJob) -> dict[str, Any]:
    from deepspec.regenerate import workers

    t0 = time.perf_counter()
    base = OutputPaths(Path(job.output_path))
    paths = base.shard(job.shard) if job.shard else base
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
        todo = [k for k in mine if k not in done]
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
    if missing:
        raise ShardError(
            f"{len(missing)} records were not finished (first index {missing[0]}); re-run to resume"
        )
    ordered = [done[k] for k in mine]
    write_jsonl_atomic(paths.output, ordered)
    errors = [
        {"index": r["index"], "line": r["line"], "id": r["id"], "status": r["status"], "reason": r["error"]}
        for r in ordered
        if r["status"] in ("skipped", "error")
    ]
    write_jsonl_atomic(paths.errors, errors)

    wall = time.perf_counter() - t0
    sent = len(mine) - resumed
    summary = account(ordered, len(mine))
    summary.update(
        {
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
    write_json_atomic(paths.summary, summary)
    if job.progress:
        print(f"{paths.output}: {invariant_line(summary)}", file=sys.stderr)
    return summary
