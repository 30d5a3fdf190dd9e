"""The FastAPI application: ``/health``, ``/metrics``, ``/v1/models`` and ``/v1/chat/completions``.

A thin HTTP layer over :class:`deepspec.serve.engine.GenerationEngine`. ``transformers serve`` was
evaluated first (transformers 5.23): it rejects the ``top_k`` / ``min_p`` extensions with 422, its
``/v1/models`` fails offline, and it seeds with the process-global RNG; hence this layer.

Provenance: ``/v1/models`` lists the served name with ``owned_by`` ``"deepspec"``, the model path as
``root`` and the target ``revision``; every completion carries the revision as
``system_fingerprint`` (a standard field the ``openai`` client exposes).

``stream=true`` sends the answer's text as the engine produces it (one chunk per new piece of
text). ``/metrics`` serves Prometheus counters and gauges (requests, tokens, running and queued
requests, decode steps).

With a speculative engine (``deepspec serve --draft``, :mod:`deepspec.serve.speculative`) every
answer carries its speculative counts in vLLM's ``metrics.speculative_decoding`` and, when the
request sets ``return_spec_tokens_details``, SGLang's ``sglext.spec_tokens_details``
(:mod:`deepspec.serve.spec_stats`); ``/metrics`` adds the engines' speculative families.

With ``request_log`` set, one JSON line per request is appended: time, the ``X-Deepspec-Record``
header, HTTP status, prompt and completion tokens, finish reason and latency.
"""

# No `from __future__ import annotations`: FastAPI must resolve the handlers' `Request` annotation.
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from deepspec.data.template import TemplateError, render_prompt
from deepspec.serve.engine import Completion, GenerationEngine
from deepspec.serve.protocol import BadRequest, ChatRequest, parse_chat_request
from deepspec.serve.spec_stats import response_fields
from deepspec.serve.speculative import SpeculativeCollector, SpeculativeGenerationEngine

RECORD_HEADER = "x-deepspec-record"


class RequestLog:
    """Append-only JSONL request log, safe to call from the event loop."""

    def __init__(self, path: str | None) -> None:
        self._file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115 (closed in close())
        self._lock = threading.Lock()

    def write(self, **entry: Any) -> None:
        if self._file is None:
            return
        line = json.dumps({"time": round(time.time(), 3), **entry}, ensure_ascii=False)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": kind, "param": param, "code": code}},
    )


class EngineCollector:
    """Prometheus view of the engine's counters (read at scrape time, no bookkeeping of its own)."""

    def __init__(self, engine: GenerationEngine, served_model_name: str) -> None:
        self.engine = engine
        self.labels = {"model": served_model_name}

    def collect(self) -> Any:
        stats = self.engine.stats
        counters = {
            "deepspec_requests": ("requests admitted", stats["requests"]),
            "deepspec_generation_tokens": ("completion tokens produced", stats["generated_tokens"]),
            "deepspec_decode_steps": ("decode steps run", stats["steps"]),
            "deepspec_prefill_batches": ("prefills run (each admits one or more requests)", stats["batches"]),
            "deepspec_decode_step_seconds": ("time spent in decode steps", stats["step_seconds"]),
        }
        for name, (doc, value) in counters.items():
            family = CounterMetricFamily(name, doc, labels=list(self.labels))
            family.add_metric(list(self.labels.values()), value)
            yield family
        gauges = {
            "deepspec_running_requests": ("requests decoding now", self.engine.active_rows),
            "deepspec_queued_requests": ("requests waiting for a slot", self.engine.queued),
            "deepspec_max_batch_size": (
                "cache slots (most requests decoding together)",
                self.engine.max_batch_size,
            ),
        }
        for name, (doc, value) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=list(self.labels))
            family.add_metric(list(self.labels.values()), value)
            yield family


def create_app(
    engine: GenerationEngine | SpeculativeGenerationEngine,
    *,
    served_model_name: str,
    revision: str | None = None,
    request_log: str | None = None,
) -> FastAPI:
    """Build the app; the engine's worker thread starts and stops with the app's lifespan."""
    created = int(time.time())
    names = (served_model_name, engine.model_path)
    reqlog = RequestLog(request_log)
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine, served_model_name))
    if isinstance(engine, SpeculativeGenerationEngine):
        registry.register(SpeculativeCollector(engine, served_model_name))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            reqlog.close()

    app = FastAPI(title="deepspec embedded server", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served_model_name, "revision": revision, **engine.stats}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": served_model_name,
            "object": "model",
            "created": created,
            "owned_by": "deepspec",
            "root": engine.model_path,
            "revision": revision,
            "max_model_len": engine.max_context,
        }
        return {"object": "list", "data": [card]}

    async def _prepare(request: Request) -> tuple[ChatRequest, list[int]]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from e
        req = parse_chat_request(body, names)
        try:  # in the event loop: a thread hop per request costs more than it saves (the GIL)
            prompt = render_prompt(engine.tokenizer, req.messages, req.chat_template_kwargs, req.tools)
        except TemplateError as e:
            raise BadRequest(str(e), "messages") from e
        room = engine.room_for(len(prompt))
        if room is not None and room < 1:
            raise BadRequest(
                f"prompt is {len(prompt)} tokens; the model context is {engine.max_context}", "messages"
            )
        wanted = req.max_tokens if req.max_tokens is not None else room
        if wanted is None:
            raise BadRequest("max_tokens is required (the model context length is unknown)", "max_tokens")
        req.params.max_tokens = min(wanted, room) if room is not None else wanted
        engine.check_params(req.params)
        return req, prompt

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        t0 = time.perf_counter()
        record = request.headers.get(RECORD_HEADER)
        try:
            req, prompt = await _prepare(request)
        except BadRequest as e:
            reqlog.write(record=record, status=400, error=e.message)
            return _error(400, e.message, e.param, e.code)
        if req.stream:
            pieces: asyncio.Queue[str] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            future = engine.submit(
                prompt, req.params, lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
            )
            return StreamingResponse(
                _sse(f"chatcmpl-{uuid.uuid4().hex}", req, asyncio.wrap_future(future), pieces, record, t0),
                media_type="text/event-stream",
            )
        try:
            result: Completion = await asyncio.wrap_future(engine.submit(prompt, req.params))
        except Exception as e:
            reqlog.write(record=record, status=500, error=f"{type(e).__name__}: {e}")
            return _error(500, f"generation failed: {type(e).__name__}: {e}")
        _log_result(record, result, t0)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        return {
            "id": cid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "system_fingerprint": revision,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(result),
            **response_fields(result.spec, req.return_spec_tokens_details),
        }

    def _usage(result: Completion) -> dict[str, int]:
        return {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        }

    def _log_result(record: str | None, result: Completion, t0: float) -> None:
        reqlog.write(
            record=record,
            status=200,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            finish_reason=result.finish_reason,
            latency_s=round(time.perf_counter() - t0, 4),
        )

    def _sse(
        cid: str,
        req: ChatRequest,
        done: asyncio.Future,
        pieces: asyncio.Queue[str],
        record: str | None,
        t0: float,
    ) -> AsyncIterator[str]:
        """Server-sent events for ``stream=true``: each piece of text as the engine produces it.

        The engine's pieces are a prefix of the final text; whatever it held back (text that might
        have started a stop string) is sent once the request is finished.
        """

        def chunk(delta: dict[str, Any], finish: str | None, with_usage: bool = False) -> str:
            body: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": req.model,
                "system_fingerprint": revision,
                "choices": [] if with_usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if with_usage:
                body["usage"] = _usage(done.result())
            if finish is not None:  # the last chunk of the answer carries its speculative counts
                body.update(response_fields(done.result().spec, req.return_spec_tokens_details))
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def gen() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""}, None)
            sent = ""
            while not done.done():
                get = asyncio.ensure_future(pieces.get())
                await asyncio.wait({get, done}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    sent += get.result()
                    yield chunk({"content": get.result()}, None)
                else:
                    get.cancel()
            while not pieces.empty():  # pieces queued before the answer was finished
                piece = pieces.get_nowait()
                sent += piece
                yield chunk({"content": piece}, None)
            try:
                result: Completion = done.result()
            except Exception as e:
                reqlog.write(record=record, status=500, error=f"{type(e).__name__}: {e}")
                error = {
                    "error": {
                        "message": f"generation failed: {type(e).__name__}: {e}",
                        "type": "server_error",
                    }
                }
                yield f"data: {json.dumps(error)}\n\n"
                return
            _log_result(record, result, t0)
            rest = result.text[len(sent) :] if result.text.startswith(sent) else ""
            if rest:
                yield chunk({"content": rest}, None)
            yield chunk({}, result.finish_reason)
            if req.include_usage:
                yield chunk({}, None, with_usage=True)
            yield "data: [DONE]\n\n"

        return gen()

    return app
