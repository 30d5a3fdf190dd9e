"""OpenAI-compatible endpoints through the official ``openai`` async client.

One :class:`Endpoint` per base URL, each with its own concurrency limit (a semaphore). The
:class:`EndpointPool` probes every endpoint at start (``GET /v1/models``, then ``/health``), skips
the unhealthy ones with a warning, and sends each request to the least-loaded healthy endpoint
(preferring another one than the endpoint that just failed). Retries (exponential backoff with full
jitter, ``Retry-After`` honoured) happen on connection errors, timeouts, 408, 429 and 5xx only; any
other 4xx is a permanent error carrying the server's reason.

Per-request CPU matters (a regeneration sends millions of requests), so three choices keep the
client lean, each measured in bench/REGEN.md:

* the request body is serialised once with :mod:`json` and sent through
  ``AsyncOpenAI.post(..., content=..., cast_to=Response)``; the answer is read as plain JSON. The
  openai client still builds the request (auth, headers, timeouts) and turns HTTP errors into its
  exception types, but skips the typed request transform and the pydantic response model;
* the HTTP transport is aiohttp through the SDK's own ``openai.DefaultAioHttpClient`` (the
  ``openai[aiohttp]`` extra, documented by OpenAI "for improved concurrency performance"): its C
  HTTP parser and O(1) connection pool cost about half the CPU of httpx2 + httpcore2 + h11;
* ``uvloop`` runs the event loop (``runner._install_uvloop``).

Beyond one core, throughput scales with worker processes (``deepspec regenerate --workers N``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

log = logging.getLogger("deepspec.regenerate")

RECORD_HEADER = "X-Deepspec-Record"
ATTEMPT_HEADER = "X-Deepspec-Attempt"
PROBE_TIMEOUT_S = 10.0


class NoHealthyEndpoint(RuntimeError):
    """Every endpoint failed its health probe."""


def normalise_base_url(url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1``; a URL with a path is kept as given."""
    parts = urlsplit(url.strip())
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"endpoint {url!r} is not a URL; expected e.g. http://host:30000/v1")
    path = parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def header_value(key: str) -> str:
    """A record key made safe for an HTTP header (printable ASCII; other bytes percent-encoded)."""
    return quote(key, safe="!#$&'()*+,-./:;<=>?@[]^_`{|}~ ")


@dataclass
class Completion:
    """The outcome of one assistant turn (after retries)."""

    message: dict[str, Any] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    endpoint: str | None = None
    retries: int = 0
    error: str | None = None


@dataclass
class EndpointStats:
    requests: int = 0
    ok: int = 0
    transient_failures: int = 0
    permanent_failures: int = 0


@dataclass
class Endpoint:
    """One base URL, its client and its concurrency limit."""

    base_url: str
    concurrency: int
    client: Any = None  # openai.AsyncOpenAI
    in_flight: int = 0
    healthy: bool = False
    reason: str = ""
    models: list[str] = field(default_factory=list)
    stats: EndpointStats = field(default_factory=EndpointStats)
    semaphore: asyncio.Semaphore | None = None
    response_type: Any = None  # the http client's Response class: the openai client returns it unparsed

    def open(self, api_key: str, timeout_s: float) -> None:
        import httpx2
        import openai

        limits = httpx2.Limits(
            max_connections=self.concurrency,
            max_keepalive_connections=self.concurrency,
            keepalive_expiry=30.0,
        )
        self.client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=api_key,
            max_retries=0,  # retries are ours: backoff, jitter and endpoint choice
            timeout=timeout_s,
            http_client=openai.DefaultAioHttpClient(limits=limits, timeout=timeout_s),
        )
        self.semaphore = asyncio.Semaphore(self.concurrency)
        self.response_type = httpx2.Response

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def probe(self) -> None:
        """Health probe: list models (``/v1/models``); fall back to ``GET /health`` on the server root."""
        client = self.client
        try:
            page = await client.models.list(timeout=PROBE_TIMEOUT_S)
            self.models = [m.id for m in page.data]
            self.healthy = True
            return
        except Exception as e:
            first = _reason(e)
        root = self.base_url.rsplit("/v1", 1)[0] if self.base_url.endswith("/v1") else self.base_url
        try:
            http = client._client  # the httpx client the openai client owns
            r = await http.get(root + "/health", timeout=PROBE_TIMEOUT_S)
            self.healthy = r.status_code < 400
            self.reason = "" if self.healthy else f"/v1/models: {first}; /health: HTTP {r.status_code}"
        except Exception as e:
            self.reason = f"/v1/models: {first}; /health: {_reason(e)}"


def _drop_none(value: Any) -> Any:
    """Remove None fields recursively (what ``model_dump(exclude_none=True)`` gave)."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return e


def _reason(e: BaseException) -> str:
    """A one-line reason for the error file and logs.

    For network errors it names the transport's own exception at the end of the chain: the aiohttp
    transport maps e.g. a dropped connection to httpx's ``ConnectTimeout``, which would mislead.
    """
    import openai

    if isinstance(e, openai.APIStatusError):
        msg = e.message if isinstance(e.message, str) else str(e.message)
        return f"HTTP {e.status_code}: {msg[:300]}"
    root = _root_cause(e)
    if root is e:
        return "timeout" if isinstance(e, openai.APITimeoutError) else f"{type(e).__name__}: {e}"[:300]
    timed_out = isinstance(root, (TimeoutError, asyncio.TimeoutError)) or "Timeout" in type(root).__name__
    return f"{'timeout' if timed_out else 'connection error'} ({type(root).__name__}: {root})"[:300]


def is_transient(e: BaseException) -> bool:
    """Retry on connection errors, timeouts, 408, 429 and 5xx; never on other 4xx."""
    import openai

    if isinstance(e, openai.APIStatusError):
        return e.status_code in (408, 429) or e.status_code >= 500
    return isinstance(e, openai.APIConnectionError)  # includes APITimeoutError


def _retry_after(e: BaseException) -> float | None:
    response = getattr(e, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class EndpointPool:
    """All endpoints of a run, with request routing, retries and per-endpoint statistics."""

    def __init__(
        self,
        base_urls: list[str],
        *,
        concurrency: int,
        api_key: str = "EMPTY",
        request_timeout_s: float = 600.0,
        max_retries: int = 6,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        if not base_urls:
            raise ValueError("no endpoint given")
        urls = list(dict.fromkeys(normalise_base_url(u) for u in base_urls))
        self.endpoints = [Endpoint(u, concurrency) for u in urls]
        self.api_key = api_key
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.rng = rng or random.Random()
        self.retries = 0

    @property
    def healthy(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.healthy]

    @property
    def total_concurrency(self) -> int:
        return sum(e.concurrency for e in self.healthy)

    async def start(self) -> None:
        """Open clients and probe every endpoint; raise :class:`NoHealthyEndpoint` if none answers."""
        for e in self.endpoints:
            e.open(self.api_key, self.request_timeout_s)
        await asyncio.gather(*(e.probe() for e in self.endpoints))
        for e in self.endpoints:
            if not e.healthy:
                log.warning("endpoint %s is unhealthy and will not be used: %s", e.base_url, e.reason)
        if not self.healthy:
            details = "\n".join(f"  {e.base_url}: {e.reason}" for e in self.endpoints)
            raise NoHealthyEndpoint(
                "no healthy endpoint (probed GET /v1/models and /health):\n"
                + details
                + "\ncheck that the server is up and the URL is right (e.g. http://host:30000/v1)"
            )

    async def close(self) -> None:
        await asyncio.gather(*(e.close() for e in self.endpoints))

    def served_model(self) -> str | None:
        """The first model id listed by a healthy endpoint."""
        return next((e.models[0] for e in self.healthy if e.models), None)

    def _choose(self, avoid: Endpoint | None) -> Endpoint:
        candidates = self.healthy
        if avoid is not None and len(candidates) > 1:
            candidates = [e for e in candidates if e is not avoid]
        return min(candidates, key=lambda e: e.in_flight / e.concurrency)

    def backoff(self, retry: int, retry_after: float | None = None) -> float:
        """Full jitter: uniform(0, min(max, initial * 2**retry)), at least a server's Retry-After."""
        delay = self.rng.uniform(0, min(self.backoff_max_s, self.backoff_initial_s * 2**retry))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay

    async def complete(
        self,
        messages: list[dict[str, Any]],
        *,
        key: str,
        model: str,
        params: dict[str, Any],
        extra_body: dict[str, Any],
    ) -> Completion:
        """One chat completion with retries; never raises for server or network problems."""
        avoid: Endpoint | None = None
        last = ""
        # Serialised once for all attempts; the openai client sends the bytes as they are.
        payload = json.dumps({"model": model, "messages": messages, **params, **extra_body}).encode()
        hkey = header_value(key)
        for attempt in range(self.max_retries + 1):
            ep = self._choose(avoid)
            assert ep.semaphore is not None
            async with ep.semaphore:
                ep.in_flight += 1
                ep.stats.requests += 1
                try:
                    raw = await ep.client.post(
                        "/chat/completions",
                        content=payload,
                        cast_to=ep.response_type,
                        options={
                            "headers": {RECORD_HEADER: hkey, ATTEMPT_HEADER: str(attempt + 1)},
                            # ours, not the client's uuid4 (os.urandom costs ~0.05-0.15 ms on some VMs)
                            "idempotency_key": f"deepspec-{hkey}-{attempt + 1}",
                        },
                    )
                    body = raw.content
                except Exception as e:
                    error: BaseException | None = e
                else:
                    error = None
                finally:
                    ep.in_flight -= 1
            if error is None:
                return self._parse(body, ep, attempt)
            last = _reason(error)
            if not is_transient(error):
                ep.stats.permanent_failures += 1
                return Completion(endpoint=ep.base_url, retries=attempt, error=f"permanent error: {last}")
            ep.stats.transient_failures += 1
            if attempt < self.max_retries:
                self.retries += 1
                avoid = ep
                await asyncio.sleep(self.backoff(attempt, _retry_after(error)))
        return Completion(
            retries=self.max_retries, error=f"gave up after {self.max_retries + 1} attempts; last: {last}"
        )

    @staticmethod
    def _parse(body: bytes, ep: Endpoint, attempt: int) -> Completion:
        """Read the chat-completion JSON directly (no per-request pydantic model: ~0.5 ms saved)."""
        try:
            data = json.loads(body)
            choice = data["choices"][0]
            msg = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            ep.stats.permanent_failures += 1
            return Completion(
                endpoint=ep.base_url,
                retries=attempt,
                error=f"server answered without a chat completion: {body[:200]!r}",
            )
        ep.stats.ok += 1
        message: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        if reasoning:
            message["reasoning_content"] = reasoning
        if msg.get("tool_calls"):
            message["tool_calls"] = [_drop_none(tc) for tc in msg["tool_calls"]]
        usage = data.get("usage") or {}
        return Completion(
            message=message,
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=usage.get("prompt_tokens") or 0,
            completion_tokens=usage.get("completion_tokens") or 0,
            endpoint=ep.base_url,
            retries=attempt,
        )

    def stats(self) -> dict[str, dict[str, Any]]:
        return {
            e.base_url: {"healthy": e.healthy, **vars(e.stats), **({"reason": e.reason} if e.reason else {})}
            for e in self.endpoints
        }
