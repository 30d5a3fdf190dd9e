"""Answer regeneration: re-ask the target every assistant turn of a conversation data set.

Library first, CLI (``deepspec regenerate``) thin over it:

* :mod:`.plan`: which turns are kept and where an assistant answer is generated;
* :mod:`.endpoints`: the official ``openai`` async client over one or many base URLs, with
  per-endpoint concurrency, a health probe, retries (exponential backoff, full jitter) and timeouts;
* :mod:`.journal`: the append-only, fsync'd journal that makes a run resumable after SIGKILL;
* :mod:`.workers`: ``--workers N`` client processes, each with its own journal, folded by the parent;
* :mod:`.shards`: output file naming, ``--shard i/n`` for Kubernetes Indexed Jobs, and the merge;
* :mod:`.summary`: the accounting invariant ``ok + truncated + error + skipped == input`` and stats;
* :mod:`.job`: :class:`RegenerationJob` (what a run needs, defined once) and reading its input;
* :mod:`.send`: one process's sending loop, shared by the runner and the worker processes;
* :mod:`.runner`: :func:`regenerate` ties them together.

Nothing heavy is imported here so that ``deepspec --help`` stays fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RegenerationError", "RegenerationJob", "merge_shards", "regenerate"]


def __getattr__(name: str) -> Any:
    if name in ("RegenerationJob", "RegenerationError"):
        from deepspec.regenerate import job

        return getattr(job, name)
    if name == "regenerate":
        from deepspec.regenerate.runner import regenerate

        return regenerate
    if name == "merge_shards":
        from deepspec.regenerate.shards import merge_shards

        return merge_shards
    raise AttributeError(name)
