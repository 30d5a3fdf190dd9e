"""OpenAI chat-completions request parsing with clear 400 errors (no FastAPI/torch imports here).

The parser accepts the OpenAI fields plus the extensions that vLLM and SGLang accept as extra body
fields: ``top_k``, ``min_p`` and ``chat_template_kwargs`` (e.g. ``{"enable_thinking": false}``).
Fields that would change the answer but are not implemented (``n > 1``, penalties, logprobs) are
rejected rather than silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deepspec.serve.sampling import SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")


class BadRequest(ValueError):
    """A client error answered with HTTP 400 (``param`` names the offending field)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass
class ChatRequest:
    """A validated chat-completion request."""

    model: str
    messages: list[dict[str, Any]]
    params: SamplingParams
    max_tokens: int | None  # None = as many as fit in the context
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None
    stream: bool = False
    include_usage: bool = False
    return_spec_tokens_details: bool = False  # SGLang's extension: sglext.spec_tokens_details


def _number(body: dict[str, Any], key: str, lo: float, hi: float, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"'{key}' must be a number, got {v!r}", key)
    if not lo <= v <= hi:
        raise BadRequest(f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return float(v)


def _integer(body: dict[str, Any], key: str, lo: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"'{key}' must be an integer, got {v!r}", key)
    if lo is not None and v < lo:
        raise BadRequest(f"'{key}' must be >= {lo}, got {v}", key)
    return v


def _content_text(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text is supported
        parts = []
        for k, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise BadRequest(
                    f"{where}.content[{k}] must be a text part {{'type': 'text', 'text': ...}}", where
                )
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"{where}.content must be a string or a list of text parts", where)


def _messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{where} must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}", where)
        msg = dict(m)
        msg["content"] = _content_text(m.get("content"), where)
        if msg["content"] is None:
            if role != "assistant" or not m.get("tool_calls"):
                raise BadRequest(f"{where} ({role}) has no content", where)
            msg["content"] = ""
        out.append(msg)
    return out


def parse_chat_request(body: Any, served_names: tuple[str, ...]) -> ChatRequest:
    """Validate a decoded JSON body; raise :class:`BadRequest` naming the field on any problem."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    model = body.get("model")
    if model is None:
        model = served_names[0]
    if model not in served_names:
        raise BadRequest(
            f"unknown model {model!r}; this server serves {served_names[0]!r} (see GET /v1/models)",
            "model",
            "model_not_found",
        )
    messages = _messages(body.get("messages"))
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise BadRequest("only n=1 is supported", "n")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise BadRequest(f"'{key}' is not supported by this server; leave it unset", key)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise BadRequest("logprobs are not supported by this server", "logprobs")
    temperature = _number(body, "temperature", 0.0, 100.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0.0:
        raise BadRequest("'top_p' must be > 0", "top_p")
    top_k = _integer(body, "top_k")
    if top_k is not None and top_k < -1:
        raise BadRequest(f"'top_k' must be -1 or 0 (off) or >= 1, got {top_k}", "top_k")
    min_p = _number(body, "min_p", 0.0, 1.0, 0.0)
    seed = _integer(body, "seed")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise BadRequest("'stop' must be a string or a list of strings", "stop")
    if any(s == "" for s in stops):
        raise BadRequest("'stop' strings must not be empty", "stop")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise BadRequest(
            "'chat_template_kwargs' must be an object, e.g. {\"enable_thinking\": false}",
            "chat_template_kwargs",
        )
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("'tools' must be a list", "tools")
    stream = bool(body.get("stream", False))
    stream_options = body.get("stream_options") or {}
    params = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k or 0, 0),
        min_p=min_p,
        seed=seed,
        max_tokens=max_tokens or 0,
        stop=stops,
    )
    return ChatRequest(
        model=model,
        messages=messages,
        params=params,
        max_tokens=max_tokens,
        chat_template_kwargs=dict(kwargs),
        tools=tools,
        stream=stream,
        include_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
        return_spec_tokens_details=bool(body.get("return_spec_tokens_details", False)),
    )
