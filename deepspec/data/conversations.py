"""Conversation records: reading JSONL in any of the supported formats, normalised to OpenAI messages.

Supported record shapes (auto-detected per record unless a format is forced):

* ``{"conversations": [{"role", "content"}, ...]}`` and ``{"messages": [...]}`` (OpenAI messages;
  extra message fields such as ``tool_calls``, ``tool_call_id`` and ``name`` are preserved);
* ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system"|..., "value": str}]}``;
* ``{"turns": [str, ...]}``: user turns only (benchmark files).

A bad line never aborts reading: it is yielded as a :class:`BadRecord` with its 1-based line number
and a reason, so callers count it as ``skipped`` and write it to an error file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Format = Literal["auto", "openai", "sharegpt", "turns"]

ROLES = ("system", "user", "assistant", "tool", "developer")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "tool": "tool",
    "function_call": "assistant",
    "observation": "tool",
}
MAX_LINE_BYTES = 8 * 1024 * 1024  # a line larger than this is skipped without being parsed


class RecordError(ValueError):
    """A record cannot be used; the message says why and what to do."""


@dataclass
class Conversation:
    """One normalised record: OpenAI-style messages plus the record's id and its other fields."""

    id: str
    messages: list[dict[str, Any]]
    line: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def prompt_turns(self) -> list[dict[str, Any]]:
        """System and user (and tool) turns only: what regeneration keeps."""
        return [m for m in self.messages if m["role"] != "assistant"]


@dataclass
class BadRecord:
    """A line that could not be read; ``line`` is 1-based."""

    line: int
    reason: str
    raw_preview: str = ""


def _normalise_openai(msgs: list[Any], where: str) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RecordError(f"{where}[{i}] is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise RecordError(f"{where}[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        msg = dict(m)
        if msg.get("content") is None and not msg.get("tool_calls"):
            raise RecordError(f"{where}[{i}] ({role}) has no content")
        out.append(msg)
    return out


def _normalise_sharegpt(msgs: list[Any], where: str) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RecordError(f"{where}[{i}] is not an object")
        who = str(m.get("from", "")).lower()
        role = SHAREGPT_ROLES.get(who)
        if role is None:
            raise RecordError(f"{where}[{i}].from is {m.get('from')!r}; expected human, gpt, system or tool")
        value = m.get("value")
        if value is None:
            raise RecordError(f"{where}[{i}] ({who}) has no value")
        out.append({"role": role, "content": value})
    return out


def _detect(obj: dict[str, Any]) -> Format:
    if "turns" in obj:
        return "turns"
    msgs = obj.get("conversations", obj.get("messages"))
    if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) and "from" in msgs[0]:
        return "sharegpt"
    return "openai"


def _validate(messages: list[dict[str, Any]]) -> None:
    if not messages:
        raise RecordError("conversation is empty")
    for i, m in enumerate(messages):
        c = m.get("content")
        if isinstance(c, str) and not c.strip() and m["role"] != "assistant" and not m.get("tool_calls"):
            raise RecordError(f"message {i} ({m['role']}) has empty content")
    first = next((m for m in messages if m["role"] not in ("system", "developer")), None)
    if first is None:
        raise RecordError("conversation has no user turn")
    if first["role"] != "user":
        raise RecordError(
            f"first non-system turn is {first['role']!r}; a conversation must start with a user turn"
        )


def parse_record(obj: Any, line: int, fmt: Format = "auto") -> Conversation:
    """Normalise one decoded JSON object (raises :class:`RecordError`)."""
    if not isinstance(obj, dict):
        raise RecordError(f"record is a JSON {type(obj).__name__}, expected an object")
    kind = _detect(obj) if fmt == "auto" else fmt
    if kind == "turns":
        turns = obj.get("turns")
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise RecordError("'turns' must be a list of strings")
        messages = [{"role": "user", "content": t} for t in turns]
        if obj.get("system"):
            messages.insert(0, {"role": "system", "content": obj["system"]})
    else:
        key = "conversations" if "conversations" in obj else "messages"
        msgs = obj.get(key)
        if not isinstance(msgs, list):
            raise RecordError("record has no 'conversations', 'messages' or 'turns' list")
        messages = (_normalise_sharegpt if kind == "sharegpt" else _normalise_openai)(msgs, key)
    _validate(messages)
    rid = obj.get("id", obj.get("question_id"))
    meta = {k: v for k, v in obj.items() if k not in ("id", "conversations", "messages", "turns")}
    return Conversation(
        id=str(rid) if rid is not None else f"line-{line}", messages=messages, line=line, meta=meta
    )


def read_conversations(path: str | Path, fmt: Format = "auto") -> Iterator[Conversation | BadRecord]:
    """Yield every line of a JSONL file as a :class:`Conversation` or a :class:`BadRecord`.

    Blank lines are ignored (not records). Lines are read as bytes so that a non-UTF-8 byte, a huge
    line or malformed JSON affect only their own record.
    """
    seen_ids: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if len(raw) > MAX_LINE_BYTES:
                yield BadRecord(
                    lineno, f"line is {len(raw):,} bytes (limit {MAX_LINE_BYTES:,}); split or shorten it"
                )
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRecord(lineno, f"not valid UTF-8 at byte {e.start}; re-encode the file as UTF-8")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield BadRecord(lineno, f"malformed JSON ({e.msg} at column {e.colno})", text[:200])
                continue
            try:
                conv = parse_record(obj, lineno, fmt)
            except RecordError as e:
                yield BadRecord(lineno, str(e), text[:200])
                continue
            if conv.id in seen_ids:
                yield BadRecord(lineno, f"duplicate id {conv.id!r} (first on line {seen_ids[conv.id]})")
                continue
            seen_ids[conv.id] = lineno
            yield conv
