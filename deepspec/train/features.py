"""Where a micro-batch's target features come from: the resident target (online) or the cache (offline).

Both sources expose the same things, so the trainer does not care which one it has: ``lengths``
(token count of every sequence, for the sampler), ``batch(indices) -> DraftBatch`` (right-padded, one
sequence per row) and ``packed_batch(rows, shape) -> DraftBatch`` (``training.packing``: several
sequences per row, position ids restarting at 0 for each; the target's attention stays inside each
sequence, see :meth:`OnlineFeatures.packed_batch`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from deepspec.data.sequences import PackedShape, TokenizedSequence, pack_batch, pad_batch

if TYPE_CHECKING:
    from deepspec.features.cache import FeatureCache
    from deepspec.models.draft import DraftBatch
    from deepspec.target_model.model import TargetModel


class FeatureSource(Protocol):
    lengths: list[int]

    def batch(self, indices: list[int]) -> DraftBatch: ...

    def packed_batch(self, rows: list[list[int]], shape: PackedShape) -> DraftBatch: ...


class OnlineFeatures:
    """Runs the frozen target under ``no_grad`` on each micro-batch (no disk)."""

    def __init__(self, target: TargetModel, sequences: list[TokenizedSequence], pad_id: int = 0):
        self.target, self.sequences, self.pad_id = target, sequences, pad_id
        self.lengths = [int(s.input_ids.numel()) for s in sequences]

    def batch(self, indices: list[int]) -> DraftBatch:
        return self._through_target(pad_batch([self.sequences[i] for i in indices], self.pad_id))

    def packed_batch(self, rows: list[list[int]], shape: PackedShape) -> DraftBatch:
        """Packed rows through the target in one forward.

        The target gets ``position_ids`` and no attention mask: transformers' mask builder
        (``masking_utils.find_packed_sequence_indices``, used by Llama, Qwen3, Mistral, Gemma... with
        sdpa / eager / flex attention, and the flash-attention varlen path) then makes attention causal
        inside each sequence, where the position ids restart at 0, and RoPE positions restart too.
        """
        laid_out = pack_batch([[self.sequences[i] for i in row] for row in rows], shape, self.pad_id)
        return self._through_target(laid_out)

    def check_packing(self, probe_tokens: int = 16) -> None:
        """Refuse packing for a target whose forward lets packed sequences see each other.

        Runs two short sequences of the data packed in one row and the second one alone: with packing
        honoured its features are the same (up to the dtype's rounding), while attention across the
        boundary changes them about as much as running both as one sequence does.
        """
        if len(self.sequences) < 2:
            return
        first, second = (
            TokenizedSequence(s.id, s.input_ids[:probe_tokens], s.loss_mask[:probe_tokens])
            for s in self.sequences[:2]
        )
        n1, n2 = first.input_ids.numel(), second.input_ids.numel()
        probe = OnlineFeatures(self.target, [first, second], self.pad_id)
        packed = probe.packed_batch([[0, 1]], PackedShape(1, n1 + n2)).features[0, n1:].float()
        alone = probe.batch([1]).features[0].float()
        joined = torch.cat([first.input_ids, second.input_ids])[None].to(self.target.device)
        continuation = self.target.capture(joined).features[0, n1:].float()  # the second after the first
        if (packed - alone).abs().max() > 0.1 * (continuation - alone).abs().max():
            raise ValueError(
                f"training.packing: the target {type(self.target.model).__name__} (attention "
                f"{getattr(self.target.config, '_attn_implementation', '?')}) lets packed sequences attend to "
                f"each other (its forward ignores packed position ids): set training.packing: false, or build "
                f"an offline feature cache (features.mode: offline), whose features are computed per sequence"
            )

    def _through_target(self, tokens: dict[str, torch.Tensor]) -> DraftBatch:
        """Laid-out tokens (:func:`pad_batch` or :func:`pack_batch`) with the target's features."""
        from deepspec.models.draft import DraftBatch

        dev = self.target.device
        t = {k: v.to(dev) for k, v in tokens.items()}
        position_ids = t.get("position_ids")
        if position_ids is None:
            out = self.target.capture(t["input_ids"], attention_mask=t["attention_mask"])
        else:
            out = self.target.capture(t["input_ids"], position_ids=position_ids)
        return DraftBatch(
            input_ids=t["input_ids"],
            attention_mask=t["attention_mask"],
            loss_mask=t["loss_mask"],
            features=out.features,
            target_last_hidden=out.last_hidden,
            position_ids=position_ids,
        )


class OfflineFeatures:
    """Reads features from a validated :class:`~deepspec.features.cache.FeatureCache` (subset of its layers)."""

    def __init__(self, cache: FeatureCache, layer_ids: list[int], device: torch.device, dtype: torch.dtype):
        self.cache, self.layer_ids, self.device, self.dtype = cache, list(layer_ids), device, dtype
        self.lengths = cache.lengths
        self.sequences = _LazySequences(cache)

    def batch(self, indices: list[int]) -> DraftBatch:
        return self._assemble(pad_batch([self.cache.sequence(i) for i in indices]), [[i] for i in indices])

    def packed_batch(self, rows: list[list[int]], shape: PackedShape) -> DraftBatch:
        """Cached features of each sequence laid side by side in its row (each was computed alone)."""
        laid_out = pack_batch([[self.cache.sequence(i) for i in row] for row in rows], shape)
        return self._assemble(laid_out, rows)

    def _assemble(self, tokens: dict[str, torch.Tensor], rows: list[list[int]]) -> DraftBatch:
        """A DraftBatch of laid-out ``tokens`` with the cached features of the sequences of ``rows``,
        placed one after the other from the start of each row."""
        from deepspec.models.draft import DraftBatch

        b, t = tokens["input_ids"].shape
        h = self.cache.hidden_size
        feats = torch.zeros(b, t, len(self.layer_ids) * h)
        last = torch.zeros(b, t, h)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                f, lh = self.cache.features(i, self.layer_ids)
                n = f.shape[0]
                feats[r, at : at + n], last[r, at : at + n] = f, lh
                at += n
        dev, dt = self.device, self.dtype
        position_ids = tokens.get("position_ids")
        return DraftBatch(
            input_ids=tokens["input_ids"].to(dev),
            attention_mask=tokens["attention_mask"].to(dev),
            loss_mask=tokens["loss_mask"].to(dev),
            features=feats.to(dev, dt),
            target_last_hidden=last.to(dev, dt),
            position_ids=None if position_ids is None else position_ids.to(dev),
        )


class _LazySequences:
    """``sequences[i]`` view over a cache (ids and masks only), e.g. for vocabulary statistics."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> TokenizedSequence:
        return self.cache.sequence(i)

    def __iter__(self):
        return (self.cache.sequence(i) for i in range(len(self.cache)))
