"""Fake SGLang / vLLM endpoints for the monitor tests.

The engines' metrics are rebuilt with the library they use themselves (prometheus-client), with
the names, types and labels of their sources (see ``deepspec/monitor/scrape.py`` for the files and
commits), and served over real HTTP on 127.0.0.1 by a small threaded server.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class FakeVLLM:
    """``SpecDecodingProm``'s four counters for one served model and one engine."""

    def __init__(self, model: str = "qwen3-8b", num_spec_tokens: int = 3) -> None:
        self.model = model
        self.k = num_spec_tokens
        self.restart()

    def restart(self) -> None:
        """A new process: fresh counters (values from 0, new ``_created`` stamps)."""
        self.registry = CollectorRegistry()
        labels = ["model_name", "engine"]
        self.drafts = Counter("vllm:spec_decode_num_drafts", "drafts", labels, registry=self.registry)
        self.draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "d", labels, registry=self.registry)
        self.accepted = Counter("vllm:spec_decode_num_accepted_tokens", "a", labels, registry=self.registry)
        self.per_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos", "p", [*labels, "position"], registry=self.registry
        )
        Gauge("vllm:num_requests_running", "r", labels, registry=self.registry).labels(self.model, "0").set(1)
        for c in (self.drafts, self.draft_tokens, self.accepted):
            c.labels(self.model, "0")
        for p in range(self.k):
            self.per_pos.labels(self.model, "0", str(p))

    def serve_steps(self, steps: int, accepted_per_step: int) -> None:
        """``steps`` verification steps that each accepted the first ``accepted_per_step`` drafts."""
        self.drafts.labels(self.model, "0").inc(steps)
        self.draft_tokens.labels(self.model, "0").inc(steps * self.k)
        self.accepted.labels(self.model, "0").inc(steps * accepted_per_step)
        for p in range(accepted_per_step):
            self.per_pos.labels(self.model, "0", str(p)).inc(steps)

    def metrics(self) -> str:
        return generate_latest(self.registry).decode()


class FakeVLLMNoSpec:
    """A vLLM without speculative decoding: no ``vllm:spec_decode_*`` series at all."""

    def metrics(self) -> str:
        reg = CollectorRegistry()
        Counter("vllm:generation_tokens", "g", ["model_name", "engine"], registry=reg).labels("m", "0").inc(5)
        return generate_latest(reg).decode()


class FakeSGLang:
    """``SchedulerMetricsCollector``'s gauges plus the tokenizer's generation-token counter.

    ``mode``: ``interval`` (gauge = last interval, kept while idle), ``cumulative`` (gauge = lifetime
    running average) or ``counters`` (also ``sglang:spec_verify_calls_total``). ``speculative=False``
    serves a non-speculative server (gauges at 0).
    """

    def __init__(self, mode: str = "interval", model: str = "qwen3-8b", speculative: bool = True) -> None:
        self.mode = mode
        self.model = model
        self.speculative = speculative
        self.restart()

    def restart(self) -> None:
        self.registry = CollectorRegistry()
        sched = ["model_name", "engine_type", "tp_rank", "pp_rank"]
        self.length = Gauge("sglang:spec_accept_length", "l", sched, registry=self.registry)
        self.rate = Gauge("sglang:spec_accept_rate", "r", sched, registry=self.registry)
        self.tokens = Counter("sglang:generation_tokens", "g", ["model_name"], registry=self.registry)
        self.verify = (
            Counter("sglang:spec_verify_calls", "v", ["model_name"], registry=self.registry)
            if self.mode == "counters"
            else None
        )
        for tp in ("0", "1"):
            self.length.labels(self.model, "unified", tp, "0").set(0.0)
            self.rate.labels(self.model, "unified", tp, "0").set(0.0)
        self.tokens.labels(self.model)
        self.life_tokens = 0.0
        self.life_steps = 0.0

    def serve_steps(self, steps: int, accept_length: float, num_draft_tokens: int = 4) -> None:
        tokens = steps * (accept_length if self.speculative else 1.0)
        self.tokens.labels(self.model).inc(tokens)
        if not self.speculative:
            return
        self.life_tokens += tokens
        self.life_steps += steps
        value = accept_length if self.mode != "cumulative" else self.life_tokens / self.life_steps
        for tp in ("0", "1"):
            self.length.labels(self.model, "unified", tp, "0").set(value)
            self.rate.labels(self.model, "unified", tp, "0").set(value / num_draft_tokens)
        if self.verify is not None:
            self.verify.labels(self.model).inc(steps)

    def metrics(self) -> str:
        return generate_latest(self.registry).decode()


class EngineServer:
    """A threaded HTTP server on 127.0.0.1: ``GET /metrics`` and ``POST /v1/chat/completions``."""

    def __init__(
        self,
        metrics: Callable[[], str] | None = None,
        chat: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.metrics = metrics
        self.chat = chat
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/metrics" and outer.metrics is not None:
                    self._send(200, outer.metrics().encode(), "text/plain; version=0.0.4")
                elif self.path == "/v1/models":
                    body = {"object": "list", "data": [{"id": "served", "object": "model", "owned_by": "x"}]}
                    self._send(200, json.dumps(body).encode(), "application/json")
                else:
                    self._send(404, b"not found", "text/plain")

            def do_POST(self) -> None:
                data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(data)
                if self.path == "/v1/chat/completions" and outer.chat is not None:
                    self._send(200, json.dumps(outer.chat(data)).encode(), "application/json")
                else:
                    self._send(404, b"not found", "text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> EngineServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def chat_response(model: str, completion_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "ok"}}
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": completion_tokens,
            "total_tokens": 10 + completion_tokens,
        },
        **extra,
    }


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
