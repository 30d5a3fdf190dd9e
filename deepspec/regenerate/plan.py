"""Which turns of a conversation are kept, and after which ones an assistant answer is generated.

Rules (one place, so that the loss-mask and feature stages can rely on them):

* system, developer, user and tool messages are kept verbatim, in order; no system prompt is ever added;
* every original assistant message is dropped, **except** one that carries ``tool_calls``: the tool
  results after it refer to its call ids, so it is kept verbatim (a server rejects orphaned tool
  results) and no answer is generated in its place;
* an answer is generated after each user or tool message that is followed by a dropped assistant
  message, by a user message, or by the end of the conversation. ``{"turns": [u1, u2, u3]}`` thus
  gets three answers, each request carrying the previously *regenerated* answers as history.
"""

from __future__ import annotations

from typing import Any

# Fields of a message that are sent back to the server as history.
HISTORY_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")


def is_dropped(message: dict[str, Any]) -> bool:
    """An original assistant turn that regeneration replaces."""
    return message.get("role") == "assistant" and not message.get("tool_calls")


def generation_points(messages: list[dict[str, Any]]) -> list[int]:
    """Indices ``j`` of kept messages after which an answer is generated."""
    points = []
    for j, m in enumerate(messages):
        if m.get("role") not in ("user", "tool"):
            continue
        nxt = messages[j + 1] if j + 1 < len(messages) else None
        if nxt is None or is_dropped(nxt) or nxt.get("role") == "user":
            points.append(j)
    return points


def history_message(message: dict[str, Any]) -> dict[str, Any]:
    """The part of a message sent to the server (drops reasoning text and dataset-specific fields)."""
    return {k: message[k] for k in HISTORY_FIELDS if k in message and message[k] is not None}
