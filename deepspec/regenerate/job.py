"""What one regeneration run needs (:class:`RegenerationJob`), and reading its input records.

The job is defined once here and travels to ``--workers`` processes as JSON
(:meth:`RegenerationJob.to_json` / :meth:`RegenerationJob.from_json`), so the runner and the workers
never copy it field by field.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepspec.config import RegenerationConfig
from deepspec.data.conversations import BadRecord, Conversation, Format, read_conversations
from deepspec.regenerate.shards import OutputPaths, Shard, parse_shard


class RegenerationError(RuntimeError):
    """A run cannot start or finish; the message says what to do."""


@dataclass
class RegenerationJob:
    """Everything one run needs (the CLI builds it from the recipe and the flags).

    ``input_path`` and ``output_path`` are local files here: the CLI maps the recipe's (possibly
    ``s3://``) locations to local ones through :class:`deepspec.layout.RunLayout`.
    """

    input_path: str
    output_path: str
    endpoints: list[str]
    settings: RegenerationConfig = field(default_factory=RegenerationConfig)
    model: str | None = None  # served model name; None = the first id of /v1/models
    revision: str | None = None
    data_format: Format = "auto"
    limit: int | None = None
    shard: Shard | None = None
    restart: bool = False
    progress: bool = True
    max_prompt_chars: int | None = None  # longer prompts are skipped (the CLI uses 16 x data.max_length)
    workers: int = 1  # client processes (see deepspec.regenerate.workers); 1 = this process only
    partial: bool = False  # send nothing: write the output from what the journal holds (see runner)

    @property
    def paths(self) -> OutputPaths:
        """This run's output, journal, errors and summary files (the shard's own when sharded)."""
        base = OutputPaths(Path(self.output_path))
        return base.shard(self.shard) if self.shard else base

    def to_json(self) -> dict[str, Any]:
        """Every field as JSON (settings as a dict, the shard as ``"i/n"``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["settings"] = self.settings.model_dump(mode="json")
        out["shard"] = str(self.shard) if self.shard else None
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RegenerationJob:
        """The inverse of :meth:`to_json`."""
        return cls(
            **{
                **data,
                "settings": RegenerationConfig.model_validate(data["settings"]),
                "shard": parse_shard(data["shard"]) if data.get("shard") else None,
            }
        )


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_input(path: str, fmt: Format, limit: int | None) -> list[Conversation | BadRecord]:
    """All input records (bad ones included), up to ``limit``."""
    if not Path(path).is_file():
        raise RegenerationError(f"input file not found: {path} (set data.path or pass --input)")
    items: list[Conversation | BadRecord] = []
    for item in read_conversations(path, fmt):
        if limit is not None and len(items) >= limit:
            break
        items.append(item)
    return items


def oversized(conv: Conversation, max_chars: int | None) -> BadRecord | None:
    """A conversation whose kept text is too long to be a useful training record."""
    if max_chars is None:
        return None
    n = sum(len(str(m.get("content") or "")) for m in conv.messages if m.get("role") != "assistant")
    if n <= max_chars:
        return None
    return BadRecord(
        conv.line,
        f"record {conv.id!r}: prompt text is {n:,} characters, more than {max_chars:,} "
        "(16 x data.max_length); raise data.max_length or remove the record",
    )


def load_items(job: RegenerationJob) -> tuple[list[Conversation | BadRecord], list[int]]:
    """All input records (over-long ones turned into bad records) and this shard's indices."""
    items = read_input(job.input_path, job.data_format, job.limit)
    for k, item in enumerate(items):
        if isinstance(item, Conversation) and (bad := oversized(item, job.max_prompt_chars)):
            items[k] = bad
    mine = [k for k in range(len(items)) if job.shard is None or job.shard.takes(k)]
    return items, mine
