"""Sending conversations to the endpoints: one process's part of a run.

Used alike by the runner (``--workers 1``) and by every worker process (``--workers N``):
:func:`open_pool` opens and probes the endpoints, :func:`send_records` regenerates the records it
is given (a list of indices, or a :class:`WorkSource` fed by the parent) and hands each finished
record to a callback.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from deepspec.config import RegenerationConfig
from deepspec.data.conversations import BadRecord, Conversation
from deepspec.data.template import template_kwargs
from deepspec.regenerate.endpoints import EndpointPool, NoHealthyEndpoint
from deepspec.regenerate.job import RegenerationError, RegenerationJob
from deepspec.regenerate.plan import generation_points, history_message, is_dropped


def install_uvloop() -> None:
    """Use uvloop's event loop when it is installed (less CPU per request)."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


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


def provenance(s: RegenerationConfig, model: str, revision: str | None) -> dict[str, Any]:
    return {
        "model": model,
        "revision": revision,
        "sampling": s.sampling.model_dump(),
        "chat_template_kwargs": template_kwargs(s),
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
