"""KV-cache helpers shared by the engine and the prefix scheduler's profiler (no import between them)."""

from __future__ import annotations

from typing import Any


def crop_cache(cache: Any, length: int) -> None:
    """Drop cached positions past ``length``.

    A negative argument to ``Cache.crop`` removes that many tokens in every transformers 5.x release
    (5.23 rejects positive absolute lengths, older releases accept both), so only that form is used.
    """
    remove = cache.get_seq_length() - length
    if remove < 0:
        raise ValueError(f"cannot crop a cache of {cache.get_seq_length()} tokens to {length}")
    if remove:
        cache.crop(-remove)
