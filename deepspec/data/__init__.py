"""Conversation data: readers, normalisation, chat-template rendering and loss masks."""

from deepspec.data.conversations import BadRecord, Conversation, RecordError, parse_record, read_conversations

__all__ = ["BadRecord", "Conversation", "RecordError", "parse_record", "read_conversations"]
