"""Conversation data: readers, normalisation, chat-template rendering and loss masks."""

from deepspec.data.conversations import BadRecord, Conversation, RecordError, parse_record, read_conversations
from deepspec.data.template import (
    TemplateError,
    assistant_spans,
    end_of_turn,
    render_prompt,
    render_with_mask,
)

__all__ = [
    "BadRecord",
    "Conversation",
    "RecordError",
    "TemplateError",
    "assistant_spans",
    "end_of_turn",
    "parse_record",
    "read_conversations",
    "render_prompt",
    "render_with_mask",
]
