"""Prefill and fixed-size decode steps of a frozen target over a :class:`RowKVCache`.

``DecodeCore.step(ids [B, T], positions [B, T])`` runs the target over ``T`` new tokens of rows
``0..B-1`` (``T = 1`` for plain decoding, ``T = gamma + 1`` for verification) and returns the
logits of every new position (and the captured target features, for the drafters). On CUDA, each
``(B, T, kv_len)`` shape is captured once as a CUDA graph (``torch.cuda.CUDAGraph``) and replayed:
a forward becomes one graph launch instead of hundreds of kernel launches from Python, which is
what bounds a small target at small batch. The attention window ``kv_len`` is rounded up to a
bucket (powers of two from 256), so short sequences do not pay for reading the whole cache.

The returned tensors of a replayed step are the graph's own output buffers: they are overwritten by
the next step of the same shape, so callers copy what they keep.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from deepspec.decode.cache import RowKVCache, attention_mask

if TYPE_CHECKING:
    from deepspec.target_model.model import TargetModel

log = logging.getLogger(__name__)

MIN_KV_BUCKET = 256


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, T, V] in the target's dtype
    features: torch.Tensor | None  # [B, T, k*H] target features of the new positions (None: not captured)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor
    positions: torch.Tensor
    out: StepOutput


def kv_bucket(needed: int, max_len: int) -> int:
    """The attention window for sequences of up to ``needed`` tokens: a power of two >= 256, capped."""
    size = MIN_KV_BUCKET
    while size < needed:
        size *= 2
    return min(size, max_len)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


class DecodeCore:
    """A frozen target, its row cache and (on CUDA) the captured step graphs."""

    def __init__(
        self,
        target: TargetModel,
        rows: int,
        max_len: int,
        *,
        features: bool = True,
        cuda_graphs: bool | None = None,
    ) -> None:
        cfg = _text_config(target.config)
        heads = int(cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        self.target = target
        self.device = target.lm_head.weight.device
        self.rows = rows
        self.max_len = max_len
        self.features = features
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a target on a CUDA device")
        self.cache = RowKVCache(
            target.num_layers, rows, max_len, kv_heads, int(head_dim), target.dtype, self.device
        )
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.graph_replays = 0

    def fits(self, rows: int, max_len: int) -> bool:
        return rows <= self.rows and max_len <= self.max_len

    def resize(self, rows: int, max_len: int) -> None:
        """Grow the cache to ``rows`` x ``max_len``, keeping what the rows hold (graphs are re-captured)."""
        rows, max_len = max(rows, self.rows), max(max_len, self.max_len)
        if (rows, max_len) == (self.rows, self.max_len):
            return
        old = self.cache
        k0 = old.keys[0]
        self.cache = RowKVCache(len(old.keys), rows, max_len, k0.shape[1], k0.shape[3], k0.dtype, k0.device)
        for new_buf, old_buf in zip(self.cache.keys + self.cache.values, old.keys + old.values, strict=True):
            new_buf[: self.rows, :, : self.max_len] = old_buf
        self.rows, self.max_len = rows, max_len
        self._graphs.clear()

    # ---------------------------------------------------------------------------------------------

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, rows: slice | torch.Tensor, kv_len: int
    ) -> StepOutput:
        self.cache.bind(rows, positions, kv_len)
        mask = attention_mask(positions, kv_len)
        if self.features:
            out = self.target.capture(
                ids, attention_mask=mask, past_key_values=self.cache, use_cache=True, position_ids=positions
            )
            return StepOutput(self.target.compute_logits(out.last_hidden), out.features)
        base = self.target.base(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=self.cache,
            use_cache=True,
            position_ids=positions,
        )
        self.target._captured.clear()  # the feature hooks fire anyway; drop what they kept
        return StepOutput(self.target.compute_logits(base.last_hidden_state), None)

    @torch.no_grad()
    def prefill(
        self, rows: list[int], prompts: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Run the prompts (right-padded into one batch) into cache rows ``rows``.

        Returns the logits after each prompt's last token ``[n, V]`` and, when features are
        captured, each prompt's features ``[len_i, k*H]``. Pad positions write junk past each row's
        length, which the mask hides and later tokens overwrite.
        """
        lengths = [int(p.numel()) for p in prompts]
        width = max(lengths)
        if width > self.max_len:
            raise ValueError(f"prompt of {width} tokens does not fit the {self.max_len}-token cache")
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, : lengths[i]] = p.to(self.device)
        positions = torch.arange(width, device=self.device).expand(len(prompts), width)
        row_index = torch.tensor(rows, dtype=torch.long, device=self.device)
        feats_on = self.features
        self.cache.bind(row_index, positions, width)
        mask = attention_mask(positions, width)
        out = self.target.capture(
            ids, attention_mask=mask, past_key_values=self.cache, use_cache=True, position_ids=positions
        )
        last = torch.tensor([n - 1 for n in lengths], device=self.device)
        hidden = out.last_hidden[torch.arange(len(prompts), device=self.device), last]
        logits = self.target.compute_logits(hidden)
        features = [out.features[i, :n] for i, n in enumerate(lengths)] if feats_on else None
        return logits, features

    @torch.no_grad()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, needed: int | None = None) -> StepOutput:
        """``T`` new tokens for rows ``0..B-1`` at ``positions`` [B, T]; ``needed`` = the longest
        sequence after this step (host-known; sets the attention window, default the whole cache)."""
        b, t = ids.shape
        if b > self.rows:
            raise ValueError(f"{b} rows requested from a {self.rows}-row cache")
        positions = positions.clamp(max=self.max_len - 1)
        kv_len = kv_bucket(needed, self.max_len) if needed is not None else self.max_len
        if not self.cuda_graphs:
            return self._forward(ids, positions, slice(0, b), kv_len)
        key = (b, t, kv_len)
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = self._capture(ids, positions, kv_len)
            except RuntimeError:  # an op that cannot be captured: keep working, eagerly, and say so
                log.exception("CUDA graph capture failed for shape %s; running eagerly", key)
                self.cuda_graphs = False
                return self._forward(ids, positions, slice(0, b), kv_len)
            self._graphs[key] = graph
        graph.ids.copy_(ids)
        graph.positions.copy_(positions)
        graph.graph.replay()
        self.graph_replays += 1
        return graph.out

    def _capture(self, ids: torch.Tensor, positions: torch.Tensor, kv_len: int) -> _Graph:
        """Warm up on a side stream, then capture; the warm-up writes exactly what this step writes."""
        b = ids.shape[0]
        static_ids, static_pos = ids.clone(), positions.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(static_ids, static_pos, slice(0, b), kv_len)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(static_ids, static_pos, slice(0, b), kv_len)
        log.debug("captured a decode step graph for shape %s", (b, ids.shape[1], kv_len))
        return _Graph(graph, static_ids, static_pos, out)

    @property
    def graph_shapes(self) -> list[tuple[int, int, int]]:
        return sorted(self._graphs)
