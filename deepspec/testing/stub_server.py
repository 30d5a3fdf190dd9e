"""A deterministic OpenAI-compatible stub server for tests and client benchmarks.

Serves ``GET /health``, ``GET /v1/models`` and ``POST /v1/chat/completions`` (non-streaming). The
answer is derived from the request alone, so a test can predict it exactly::

    "A<turn> to '<first 48 chars of the last user message>' seed=<seed> think=<enable_thinking> w1 w2 ..."

where ``turn`` is the number of assistant messages already in the request + 1 and the ``w<i>``
filler words pad the answer to ``answer_words`` words. A "token" is a whitespace-separated word:
``max_tokens`` cuts the answer and sets ``finish_reason="length"``; ``usage`` counts words.

Fault injection is deterministic per request key (the ``X-Deepspec-Record`` header, ``<id>#<turn>``)
and per attempt (the server counts the requests it saw for each key):

* ``fail_rate``: this fraction of keys fails its first k attempts (1 <= k <= ``fail_times``) with a
  fault drawn from ``fault_kinds`` (``500``, ``429``, ``drop`` = close the connection without an
  answer), then succeeds;
* ``permanent_rate`` / ``permanent_ids``: these keys (or record ids) always fail with
  ``permanent_status`` (e.g. 400 = a permanent client error, or 500 = a server that never recovers);
  an entry ``"<id>:<status>"`` of ``permanent_ids`` picks its own status.

Every request is appended to ``request_log`` (JSONL: key, attempt, outcome, model, max_tokens,
message count) when set. Handlers are async and latency is an ``asyncio.sleep``, so one process
sustains hundreds of concurrent requests.

Run it in-process (``with StubServer(StubConfig(...)) as url: ...``) or as a program::

    python -m deepspec.testing.stub_server --port 8100 --latency-ms 50 --fail-rate 0.2 --request-log log.jsonl
"""

# No `from __future__ import annotations`: FastAPI must resolve the handlers' `Request` annotation.
import argparse
import asyncio
import hashlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

RECORD_HEADER = "x-deepspec-record"


@dataclass
class StubConfig:
    """Behaviour of the stub server (every field has a command-line flag of the same name)."""

    model: str = "stub-model"
    latency_ms: float = 0.0
    answer_words: int = 12
    fail_rate: float = 0.0
    fail_times: int = 2
    fault_kinds: tuple[str, ...] = ("500", "429", "drop")
    permanent_rate: float = 0.0
    permanent_ids: tuple[str, ...] = ()
    permanent_status: int = 400
    request_log: str | None = None
    keep_bodies: bool = False  # keep every request body in memory (StubState.bodies), for tests
    salt: str = ""


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from the given parts."""
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def stub_answer(body: dict[str, Any], answer_words: int) -> str:
    """The full (uncut) answer the stub gives to a chat-completion request body."""
    messages = body.get("messages") or []
    turn = 1 + sum(1 for m in messages if m.get("role") == "assistant")
    last_user = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    kwargs = body.get("chat_template_kwargs") or {}
    head = f"A{turn} to {last_user[:48]!r} seed={body.get('seed')} think={kwargs.get('enable_thinking')}"
    words = head.split()
    words += [f"w{i}" for i in range(1, max(0, answer_words - len(words)) + 1)]
    return " ".join(words)


class StubState:
    """Per-key attempt counters, outcome counts and the request log of one server."""

    def __init__(self, cfg: StubConfig) -> None:
        self.cfg = cfg
        self.attempts: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.bodies: list[tuple[str, dict[str, Any]]] = []  # (key, body) when cfg.keep_bodies
        self.permanent: dict[str, int] = {}
        for entry in cfg.permanent_ids:
            rid, _, code = entry.partition(":")
            self.permanent[rid] = int(code) if code else cfg.permanent_status
        self._log: TextIO | None = open(cfg.request_log, "a", encoding="utf-8") if cfg.request_log else None  # noqa: SIM115

    def fault(self, key: str, attempt: int) -> str | None:
        """The fault this attempt gets: None (answer), ``"permanent:<status>"`` or one of ``fault_kinds``."""
        cfg = self.cfg
        if not key:
            return None
        rid = key.split("#", 1)[0]
        for k in (key, rid):
            if k in self.permanent:
                return f"permanent:{self.permanent[k]}"
        if cfg.permanent_rate and _unit(cfg.salt, "perm", key) < cfg.permanent_rate:
            return f"permanent:{cfg.permanent_status}"
        if cfg.fail_rate and _unit(cfg.salt, "fail", key) < cfg.fail_rate:
            k = 1 + int(_unit(cfg.salt, "times", key) * max(1, cfg.fail_times))
            if attempt <= k:
                kinds = cfg.fault_kinds or ("500",)
                return kinds[int(_unit(cfg.salt, "kind", key, attempt) * len(kinds))]
        return None

    def log(self, entry: dict[str, Any]) -> None:
        if self._log is not None:
            self._log.write(json.dumps(entry) + "\n")
            self._log.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def create_app(cfg: StubConfig) -> Any:
    """Build the FastAPI application (imports FastAPI lazily)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    state = StubState(cfg)
    app = FastAPI(title="deepspec stub OpenAI server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.stub = state

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": cfg.model, "object": "model", "created": 0, "owned_by": "stub"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        key = request.headers.get(RECORD_HEADER, "")
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": {"message": "request body is not JSON"}}, status_code=400)
        state.attempts[key] += 1
        attempt = state.attempts[key]
        fault = state.fault(key, attempt)
        if cfg.latency_ms:
            await asyncio.sleep(cfg.latency_ms / 1000)
        outcome = fault or "ok"
        state.outcomes[outcome] += 1
        state.log(
            {
                "t": time.time(),
                "key": key,
                "attempt": attempt,
                "outcome": outcome,
                "model": body.get("model"),
                "max_tokens": body.get("max_tokens"),
                "n_messages": len(body.get("messages") or []),
            }
        )
        if cfg.keep_bodies:
            state.bodies.append((key, body))
        if fault and fault.startswith("permanent:"):
            code = int(fault.split(":", 1)[1])
            return JSONResponse(
                {"error": {"message": f"stub permanent failure {code} for {key}"}}, status_code=code
            )
        if fault in ("500", "429", "503"):
            return JSONResponse({"error": {"message": f"stub transient {fault}"}}, status_code=int(fault))
        if fault == "drop":
            request.scope["deepspec.drop"] = True
            return Response(status_code=204)
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return JSONResponse({"error": {"message": "messages must be a non-empty list"}}, status_code=400)
        words = stub_answer(body, cfg.answer_words).split()
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        finish = "stop"
        if max_tokens is not None and len(words) > int(max_tokens):
            words, finish = words[: int(max_tokens)], "length"
        prompt_tokens = sum(len(_text(m.get("content")).split()) for m in body["messages"])
        payload = {
            "id": f"chatcmpl-{abs(hash((key, attempt))) % 10**12}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": cfg.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join(words)},
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(words),
                "total_tokens": prompt_tokens + len(words),
            },
        }
        return Response(json.dumps(payload).encode(), media_type="application/json")

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Outer ASGI layer: turns a 'drop' answer into an aborted connection."""
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def guarded_send(message: dict[str, Any]) -> None:
            if scope.get("deepspec.drop"):
                # uvicorn's send is a bound method of the request cycle, which owns the transport.
                transport = getattr(getattr(send, "__self__", None), "transport", None)
                if transport is not None:
                    transport.abort()
                    return
                if message["type"] == "http.response.start":  # fallback: promise a body, send none
                    message = {**message, "headers": [(b"content-length", b"100")]}
                else:
                    message = {"type": "http.response.body", "body": b"{", "more_body": False}
            await send(message)

        await app(scope, receive, guarded_send)

    asgi.state = state  # type: ignore[attr-defined]
    return asgi


def free_port() -> int:
    """An unused localhost TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StubServer:
    """Run the stub in a background thread: ``with StubServer(cfg) as base_url: ...``.

    ``base_url`` ends with ``/v1``; ``state`` gives the attempt counters and outcome counts.
    """

    def __init__(self, cfg: StubConfig | None = None, port: int | None = None) -> None:
        import uvicorn

        self.cfg = cfg or StubConfig()
        self.port = port or free_port()
        self.app = create_app(self.cfg)
        self.state: StubState = self.app.state
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="error", access_log=False, backlog=4096
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="stub-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"stub server did not start on port {self.port}")
            time.sleep(0.01)
        return self.base_url

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self.state.close()


@contextmanager
def stub_server(**kwargs: Any) -> Iterator[str]:
    """Shorthand: ``with stub_server(latency_ms=20) as url: ...``."""
    with StubServer(StubConfig(**kwargs)) as url:
        yield url


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--model", default=StubConfig.model)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--answer-words", type=int, default=StubConfig.answer_words)
    p.add_argument(
        "--fail-rate", type=float, default=0.0, help="fraction of request keys that fail transiently"
    )
    p.add_argument(
        "--fail-times", type=int, default=StubConfig.fail_times, help="max transient failures per key"
    )
    p.add_argument(
        "--fault-kinds", type=_csv, default=StubConfig.fault_kinds, help="comma list of 500,429,503,drop"
    )
    p.add_argument("--permanent-rate", type=float, default=0.0, help="fraction of keys that always fail")
    p.add_argument(
        "--permanent-ids",
        type=_csv,
        default=(),
        help="comma list of record ids (id or id:status) that always fail",
    )
    p.add_argument("--permanent-status", type=int, default=StubConfig.permanent_status)
    p.add_argument("--request-log", default=None, help="append one JSON line per request to this file")
    p.add_argument("--salt", default="", help="changes which keys get faults")
    a = p.parse_args(argv)
    cfg = StubConfig(
        model=a.model,
        latency_ms=a.latency_ms,
        answer_words=a.answer_words,
        fail_rate=a.fail_rate,
        fail_times=a.fail_times,
        fault_kinds=a.fault_kinds,
        permanent_rate=a.permanent_rate,
        permanent_ids=a.permanent_ids,
        permanent_status=a.permanent_status,
        request_log=a.request_log,
        salt=a.salt,
    )
    uvicorn.run(
        create_app(cfg), host=a.host, port=a.port, log_level="warning", access_log=False, backlog=4096
    )


if __name__ == "__main__":
    main()
