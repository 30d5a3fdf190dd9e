"""A static KV cache whose rows are written at their own positions.

transformers' ``StaticCache`` writes every row of a batch at the same ``cache_position``: fine for
one prompt or for left-padded prompts that all advance by one token per step, but not for
speculative rows that accept different numbers of tokens per round, nor for a server whose rows
start at different times. :class:`RowKVCache` keeps one buffer ``[rows, kv_heads, max_len,
head_dim]`` per layer and, before each forward, is told (:meth:`RowKVCache.bind`) which rows the
batch is, at which positions each row's new tokens go and how many leading positions attention
reads. The model's attention layers call :meth:`update` (transformers' ``Cache`` contract: write
the new keys and values, return the keys and values attention must see); the caller passes the
matching 4-D boolean mask (key position <= query position), so stale entries past a row's length,
left by rejected draft tokens, are never read and are overwritten later. "Cropping" a row is then
free: its length is just a number the caller keeps.

Every operation is a fixed-shape tensor operation (scatter into a view, slice), so a forward over a
bound cache can be captured in a CUDA graph and replayed with new positions.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache


class RowKVCache(Cache):
    """``rows`` independent sequences of up to ``max_len`` tokens, for a decoder of ``num_layers``."""

    def __init__(
        self,
        num_layers: int,
        rows: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__(layers=[])
        shape = (rows, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.rows = rows
        self.max_len = max_len
        self._rows: slice | torch.Tensor = slice(0, rows)
        self._kv_len = max_len
        self._positions = torch.zeros(1, 1, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return len(self.keys)

    def bind(self, rows: slice | torch.Tensor, positions: torch.Tensor, kv_len: int) -> None:
        """Set the rows (a slice, or a tensor of row ids), the new tokens' positions ``[B, T]`` and
        how many leading positions the returned keys/values span (the mask's last dimension)."""
        if not 0 < kv_len <= self.max_len:
            raise ValueError(f"kv_len {kv_len} outside (0, {self.max_len}]")
        self._rows = rows
        self._kv_len = kv_len
        self._positions = positions

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[B, kv_heads, T, head_dim]`` at the bound positions; return the bound window."""
        b, h, t, d = key_states.shape
        index = self._positions[:, None, :, None].expand(b, h, t, d)
        out = []
        for buf, new in ((self.keys[layer_idx], key_states), (self.values[layer_idx], value_states)):
            if isinstance(self._rows, slice):
                view = buf[self._rows]
                view.scatter_(2, index, new.to(buf.dtype))
                out.append(view[:, :, : self._kv_len])
            else:  # scattered rows (a server's newly admitted requests): gather, write, put back
                rows = buf.index_select(0, self._rows)
                rows.scatter_(2, index, new.to(buf.dtype))
                buf.index_copy_(0, self._rows, rows)
                out.append(rows[:, :, : self._kv_len])
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    @property
    def is_compileable(self) -> bool:
        return True


def attention_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Boolean ``[B, 1, T, kv_len]``: query at position ``p`` sees keys at positions ``0..p``."""
    keys = torch.arange(kv_len, device=positions.device)
    return (keys[None, None, :] <= positions[:, :, None])[:, None]
