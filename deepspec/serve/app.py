"""The FastAPI application: ``/health``, ``/v1/models`` and ``/v1/chat/completions``.

A thin HTTP layer over :class:`deepspec.serve.engine.GenerationEngine`. ``transformers serve`` was
evaluated first (transformers 5.23): it rejects the ``top_k`` / ``min_p`` extensions with 422, its
``/v1/models`` fails offline, and it seeds with the process-global RNG; hence this layer.

Provenance: ``/v1/models`` lists the served name with ``owned_by`` ``"deepspec"``, the model path as
``root`` and the target ``revision``; every completion carries the revision as
``system_fingerprint`` (a standard field the ``openai`` client exposes).

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
from fastapi.responses import JSONResponse, StreamingResponse

from deepspec.data.template import TemplateError, render_prompt
from deepspec.serve.engine import Completion, GenerationEngine
from deepspec.serve.protocol import BadRequest, ChatRequest, parse_chat_request

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


def create_app(
    engine: GenerationEngine,
    *,
    served_model_name: str,
    revision: str | None = None,
    request_log: str | None = None,
) -> FastAPI:
    """Build the app; the engine's worker thread starts and stops with the app's lifespan."""
    created = int(time.time())
    names = (served_model_name, engine.model_path)
    reqlog = RequestLog(request_log)

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
        try:
            prompt = await asyncio.to_thread(
                render_prompt, engine.tokenizer, req.messages, req.chat_template_kwargs, req.tools
            )
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
        try:
            result: Completion = await asyncio.wrap_future(engine.submit(prompt, req.params))
        except Exception as e:
            reqlog.write(record=record, status=500, error=f"{type(e).__name__}: {e}")
            return _error(500, f"generation failed: {type(e).__name__}: {e}")
        reqlog.write(
            record=record,
            status=200,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            finish_reason=result.finish_reason,
            latency_s=round(time.perf_counter() - t0, 4),
        )
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        usage = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        }
        if req.stream:
            return StreamingResponse(_sse(cid, req, result, usage), media_type="text/event-stream")
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
            "usage": usage,
        }

    def _sse(cid: str, req: ChatRequest, result: Completion, usage: dict[str, int]) -> AsyncIterator[str]:
        """Server-sent events for ``stream=true`` (the whole answer arrives in one content chunk)."""

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
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def gen() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""}, None)
            if result.text:
                yield chunk({"content": result.text}, None)
            yield chunk({}, result.finish_reason)
            if req.include_usage:
                yield chunk({}, None, with_usage=True)
            yield "data: [DONE]\n\n"

        return gen()

    return app
