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
message count, pid) when set. Latency is a timer, never a blocked thread, so one process sustains
thousands of concurrent requests.

Two front ends share :meth:`StubState.chat`:

* FastAPI + uvicorn in a background thread, for tests (``with StubServer(StubConfig(...)) as url``);
* the **raw** front end (:func:`serve_raw`): an asyncio protocol with a minimal HTTP/1.1 parser, no
  third-party dependency (uvloop if installed), ~3x the requests/s of FastAPI per process, and ``--workers N``
  processes on one port through ``SO_REUSEPORT``, so that a client benchmark measures the client::

    python -m deepspec.testing.stub_server --port 8100 --latency-ms 50 --workers 2
    python -m deepspec.testing.stub_server --engine fastapi --fail-rate 0.2 --request-log log.jsonl
"""

# No `from __future__ import annotations`: FastAPI must resolve the handlers' `Request` annotation.
import argparse
import asyncio
import hashlib
import json
import os
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

    def chat(self, key: str, raw: bytes) -> tuple[int, dict[str, Any] | None]:
        """Answer one ``POST /v1/chat/completions``: (status, JSON payload), payload None = drop the connection.

        The latency is applied by the caller (both front ends sleep before sending the answer).
        """
        cfg = self.cfg
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, {"error": {"message": "request body is not JSON"}}
        if not isinstance(body, dict):
            return 400, {"error": {"message": "request body must be a JSON object"}}
        self.attempts[key] += 1
        attempt = self.attempts[key]
        fault = self.fault(key, attempt)
        outcome = fault or "ok"
        self.outcomes[outcome] += 1
        if self._log is not None:
            self.log(
                {
                    "t": time.time(),
                    "key": key,
                    "attempt": attempt,
                    "outcome": outcome,
                    "model": body.get("model"),
                    "max_tokens": body.get("max_tokens"),
                    "n_messages": len(body.get("messages") or []),
                    "pid": os.getpid(),
                }
            )
        if cfg.keep_bodies:
            self.bodies.append((key, body))
        if fault and fault.startswith("permanent:"):
            code = int(fault.split(":", 1)[1])
            return code, {"error": {"message": f"stub permanent failure {code} for {key}"}}
        if fault in ("500", "429", "503"):
            return int(fault), {"error": {"message": f"stub transient {fault}"}}
        if fault == "drop":
            return 0, None
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return 400, {"error": {"message": "messages must be a non-empty list"}}
        words = stub_answer(body, cfg.answer_words).split()
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        finish = "stop"
        if max_tokens is not None and len(words) > int(max_tokens):
            words, finish = words[: int(max_tokens)], "length"
        prompt_tokens = sum(len(_text(m.get("content")).split()) for m in body["messages"])
        return 200, {
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

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": self.cfg.model, "object": "model", "created": 0, "owned_by": "stub"}],
        }

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
    from fastapi.responses import Response

    state = StubState(cfg)
    app = FastAPI(title="deepspec stub OpenAI server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.stub = state

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return state.models()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        status, payload = state.chat(request.headers.get(RECORD_HEADER, ""), await request.body())
        if cfg.latency_ms:
            await asyncio.sleep(cfg.latency_ms / 1000)
        if payload is None:
            request.scope["deepspec.drop"] = True
            return Response(status_code=204)
        return Response(json.dumps(payload).encode(), status_code=status, media_type="application/json")

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


# --------------------------------------------------------------------------------------------------
# The raw front end: asyncio protocol + a minimal HTTP/1.1 parser, several processes on one port
# --------------------------------------------------------------------------------------------------

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    411: "Length Required",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_MAX_HEAD = 64 * 1024


class _RawHttp(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection: ``Content-Length`` bodies, requests answered in order.

    About 3x the requests/s of FastAPI + uvicorn's h11 in one process (bench/REGEN.md), so that a
    benchmark measures the client and not the stub. It serves the same three routes with the same :class:`StubState` logic.
    """

    def __init__(self, state: StubState, loop: asyncio.AbstractEventLoop) -> None:
        self.state = state
        self.loop = loop
        self.latency_s = state.cfg.latency_ms / 1000
        self.buf = bytearray()
        self.busy = False  # an answer is pending (latency); later requests wait in the buffer
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._next()

    def _next(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD:
                    self._send(400, {"error": {"message": "request head too large"}}, close=True)
                return
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            try:
                method, target, _version = lines[0].split(" ", 2)
            except ValueError:
                self._send(400, {"error": {"message": "bad request line"}}, close=True)
                return
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._send(
                    411, {"error": {"message": "chunked request bodies are not supported"}}, close=True
                )
                return
            length = int(headers.get("content-length") or 0)
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            close = headers.get("connection", "").lower() == "close"
            self._dispatch(method, target.split("?", 1)[0], headers, body, close)

    def _dispatch(self, method: str, path: str, headers: dict[str, str], body: bytes, close: bool) -> None:
        path = path.rstrip("/")
        if method == "POST" and path == "/v1/chat/completions":
            status, payload = self.state.chat(headers.get(RECORD_HEADER, ""), body)
            if self.latency_s:
                self.busy = True
                self.loop.call_later(self.latency_s, self._send, status, payload, close)
            else:
                self._send(status, payload, close)
        elif method == "GET" and path == "/health":
            self._send(200, {"status": "ok"}, close)
        elif method == "GET" and path == "/v1/models":
            self._send(200, self.state.models(), close)
        else:
            self._send(404, {"error": {"message": f"no route {method} {path}"}}, close)

    def _send(self, status: int, payload: dict[str, Any] | None, close: bool) -> None:
        self.busy = False
        t = self.transport
        if t is None or t.is_closing():
            return
        if payload is None:  # injected fault: drop the connection without an answer
            t.abort()
            return
        data = json.dumps(payload).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(data)}\r\n"
            f"{'connection: close' + chr(13) + chr(10) if close else ''}\r\n"
        )
        t.write(head.encode() + data)
        if close:
            t.close()
        elif self.buf:
            self._next()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def _listen(host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def _serve_raw_socket(cfg: StubConfig, sock: socket.socket, parent: int | None = None) -> None:
    """Serve one listening socket forever (exits when ``parent`` is no longer this process's parent)."""
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    state = StubState(cfg)

    def watch_parent() -> None:
        if parent is not None and os.getppid() != parent:
            loop.stop()
            return
        loop.call_later(0.5, watch_parent)

    loop.run_until_complete(loop.create_server(lambda: _RawHttp(state, loop), sock=sock, backlog=4096))
    watch_parent()
    try:
        loop.run_forever()
    finally:
        state.close()


def serve_raw(cfg: StubConfig, host: str = "127.0.0.1", port: int = 8100, workers: int = 1) -> None:
    """Serve the stub with the raw front end in ``workers`` processes sharing ``port`` (SO_REUSEPORT).

    Each process has its own :class:`StubState`: with several workers, fault injection by attempt
    number and ``keep_bodies`` are per process (the request log is shared, one line per request).
    """
    import multiprocessing
    import signal

    socks = [_listen(host, port, reuse_port=workers > 1) for _ in range(max(1, workers))]
    procs = []
    ctx = multiprocessing.get_context("fork")
    for sock in socks[1:]:
        proc = ctx.Process(target=_serve_raw_socket, args=(cfg, sock, os.getpid()), daemon=True)
        proc.start()
        procs.append(proc)
    for sock in socks[1:]:
        sock.close()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(0)))
    try:
        _serve_raw_socket(cfg, socks[0])
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(timeout=5)


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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument(
        "--engine",
        choices=("raw", "fastapi"),
        default="raw",
        help="raw: asyncio protocol, no dependencies, cheapest per request (default); fastapi: FastAPI + uvicorn",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes serving the port (raw engine: SO_REUSEPORT sockets; fastapi: uvicorn workers are "
        "not supported, use raw)",
    )
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
    if a.engine == "raw":
        serve_raw(cfg, a.host, a.port, a.workers)
        return
    if a.workers != 1:
        p.error("--workers > 1 needs --engine raw")
    import uvicorn

    uvicorn.run(
        create_app(cfg), host=a.host, port=a.port, log_level="warning", access_log=False, backlog=4096
    )


if __name__ == "__main__":
    main()
