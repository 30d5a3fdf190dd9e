"""Where a micro-batch's target features come from: the resident target (online) or the cache (offline).

Both sources expose the same two things, so the trainer does not care which one it has:
``lengths`` (token count of every sequence, for the sampler) and ``batch(indices) -> DraftBatch``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from deepspec.data.sequences import TokenizedSequence, pad_batch

if TYPE_CHECKING:
    from deepspec.features.cache import FeatureCache
    from deepspec.models.draft import DraftBatch
    from deepspec.target_model.model import TargetModel


class FeatureSource(Protocol):
    lengths: list[int]

    def batch(self, indices: list[int]) -> DraftBatch: ...


class OnlineFeatures:
    """Runs the frozen target under ``no_grad`` on each micro-batch (no disk)."""

    def __init__(self, target: TargetModel, sequences: list[TokenizedSequence], pad_id: int = 0):
        self.target, self.sequences, self.pad_id = target, sequences, pad_id
        self.lengths = [int(s.input_ids.numel()) for s in sequences]

    def batch(self, indices: list[int]) -> DraftBatch:
        from deepspec.models.draft import DraftBatch

        dev = self.target.device
        padded = {
            k: v.to(dev) for k, v in pad_batch([self.sequences[i] for i in indices], self.pad_id).items()
        }
        out = self.target.capture(padded["input_ids"], attention_mask=padded["attention_mask"])
        return DraftBatch(
            input_ids=padded["input_ids"],
            attention_mask=padded["attention_mask"],
            loss_mask=padded["loss_mask"],
            features=out.features,
            target_last_hidden=out.last_hidden,
        )


class OfflineFeatures:
    """Reads features from a validated :class:`~deepspec.features.cache.FeatureCache` (subset of its layers)."""

    def __init__(self, cache: FeatureCache, layer_ids: list[int], device: torch.device, dtype: torch.dtype):
        self.cache, self.layer_ids, self.device, self.dtype = cache, list(layer_ids), device, dtype
        self.lengths = cache.lengths
        self.sequences = _LazySequences(cache)

    def batch(self, indices: list[int]) -> DraftBatch:
        from deepspec.models.draft import DraftBatch

        seqs = [self.cache.sequence(i) for i in indices]
        padded = pad_batch(seqs)
        b, t = padded["input_ids"].shape
        h = self.cache.hidden_size
        feats = torch.zeros(b, t, len(self.layer_ids) * h)
        last = torch.zeros(b, t, h)
        for row, i in enumerate(indices):
            f, lh = self.cache.features(i, self.layer_ids)
            feats[row, : f.shape[0]], last[row, : lh.shape[0]] = f, lh
        dev, dt = self.device, self.dtype
        return DraftBatch(
            input_ids=padded["input_ids"].to(dev),
            attention_mask=padded["attention_mask"].to(dev),
            loss_mask=padded["loss_mask"].to(dev),
            features=feats.to(dev, dt),
            target_last_hidden=last.to(dev, dt),
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
