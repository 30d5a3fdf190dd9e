"""Batched Eagle3 drafting: one draft forward per unroll step proposes for all ``B`` rows at once.

The per-sequence :class:`~deepspec.models.eagle3.Eagle3Drafter` runs one eager unroll per row, with
host-side tokens and a growable cache: hundreds of kernel launches and host syncs per round and per
row. :class:`Eagle3BatchedDrafter` holds the same state for ``rows`` sequences in fixed-size device
tensors, in the layout of the decode core's :class:`~deepspec.decode.cache.RowKVCache`:

* ``keys``/``values`` ``[rows, kv_heads, max_len, head_dim]``: the draft keys of committed pairs of
  each row at positions ``0..num_pairs[b]-1``; the unroll writes its speculative keys just past them
  (positions ``num_pairs[b] + step``), where the next :meth:`extend` overwrites them. A query at
  position ``p`` attends keys ``0..p`` (:func:`~deepspec.decode.cache.attention_mask`), which is
  exactly the per-row drafter's committed cache plus the keys of the steps so far;
* ``pending`` ``[rows, H]``: ``fc(feature)`` of each row's last committed position;
* ``num_pairs`` ``[rows]`` (device): committed pairs per row, so positions never leave the device.

:meth:`propose` and :meth:`extend` are fixed-shape tensor programs for a given ``(batch, steps,
window)``: no host read, no data-dependent shape, state updated in place. On CUDA (``cuda_graphs``)
each shape is captured once as a CUDA graph and replayed (as :class:`~deepspec.decode.core.DecodeCore`
does for the target; the capture, :class:`~deepspec.eval.graphed_draft.GraphedDrafter`, is shared with
the DFlash/DSpark block drafter of :mod:`deepspec.eval.block_batched`); on the CPU they run eagerly. Sampled proposals are inverse-CDF draws from
uniforms the caller takes from each row's own generator, so a row's proposals never depend on its
neighbours; at temperature 0 they are the argmax, as the per-row drafter's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from deepspec.decode.cache import attention_mask
from deepspec.decode.sampling import inverse_cdf
from deepspec.eval.block_batched import BlockBatchedDrafter, block_batchable
from deepspec.eval.graphed_draft import GraphedDrafter
from deepspec.models.dflash import DFlashDrafter
from deepspec.models.eagle3 import Eagle3Drafter
from deepspec.models.layers import sdpa

if TYPE_CHECKING:
    from deepspec.models.eagle3 import Eagle3Draft


def has_batched_drafter(drafter: object, num_proposals: int, record_rounds: bool = False) -> bool:
    """Whether :func:`batched_drafter` has a counterpart of ``drafter`` that proposes ``num_proposals``
    tokens per round as the per-row drafter does (Eagle3 always; DFlash/DSpark when one block holds
    them and no per-round confidences are recorded, see :func:`deepspec.eval.block_batched.block_batchable`)."""
    return isinstance(drafter, Eagle3Drafter) or block_batchable(drafter, num_proposals, record_rounds)


def batched_drafter(
    drafter: object, rows: int, max_len: int, cuda_graphs: bool | None = None
) -> GraphedDrafter | None:
    """The batched counterpart of the per-row ``drafter`` on the same draft weights, or None when
    there is none (Eagle3 here, DFlash/DSpark in :mod:`deepspec.eval.block_batched`; other drafters
    keep the per-row protocol)."""
    if isinstance(drafter, Eagle3Drafter):
        return Eagle3BatchedDrafter(drafter.model, rows, max_len, cuda_graphs=cuda_graphs)
    if isinstance(drafter, DFlashDrafter):  # DSparkDrafter included
        return BlockBatchedDrafter(drafter.model, rows, max_len, cuda_graphs=cuda_graphs)
    return None


class Eagle3BatchedDrafter(GraphedDrafter):
    """``rows`` Eagle3 sequences of up to ``max_len`` committed pairs, drafted in lockstep."""

    def __init__(
        self, model: Eagle3Draft, rows: int, max_len: int, *, cuda_graphs: bool | None = None
    ) -> None:
        m = model
        attn = m.midlayer.self_attn
        self.model = m
        self.rows, self.max_len = rows, max_len
        self.device = m.param_device
        self.dtype = m.param_dtype
        self._init_graphs(cuda_graphs)
        shape = (rows, attn.num_kv_heads, max_len, attn.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.pending = torch.zeros(rows, m.dims.hidden_size, dtype=self.dtype, device=self.device)
        self.num_pairs = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.draft_ids = m.draft_ids.to(self.device)  # [Vd] target id of each draft id
        self.vocab_size = m.dims.vocab_size

    def _state(self) -> tuple[torch.Tensor, ...]:
        return self.pending, self.num_pairs

    def fits(self, rows: int, max_len: int) -> bool:
        return rows <= self.rows and max_len <= self.max_len

    def reset(self) -> None:
        """Forget every row (buffers stay allocated, captured graphs stay valid)."""
        self.num_pairs.zero_()
        self.pending.zero_()

    # ------------------------------------------------------------------ committing
    @torch.no_grad()
    def prefill(self, row: int, tokens: torch.Tensor, features: torch.Tensor) -> None:
        """Start row ``row`` from a prompt: tokens [n] and their target features [n, k*H] (eager, once)."""
        if tokens.numel() == 0:
            return
        if features.shape[0] != tokens.numel():
            raise ValueError(f"prefill: {tokens.numel()} tokens but {features.shape[0]} feature rows")
        if tokens.numel() > self.max_len:
            raise ValueError(
                f"a prompt of {tokens.numel()} tokens does not fit the {self.max_len}-pair cache"
            )
        rows = torch.tensor([row], device=self.device)
        self.num_pairs[row] = 0
        self._extend(
            rows,
            tokens.reshape(1, -1).to(self.device),
            features[None].to(self.device),
            torch.tensor([tokens.numel()], device=self.device),
            first=True,
        )

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, features: torch.Tensor, counts: torch.Tensor) -> None:
        """Commit ``counts[b]`` leading tokens of ``tokens`` [B, T] (device) with ``features`` [B, T, k*H].

        Row ``b`` appends the pairs (pending, tokens[b, 0]), (fc(f[b, 0]), tokens[b, 1]), ...; its new
        pending feature is ``fc(features[b, counts[b] - 1])``. ``counts[b] == 0`` leaves row ``b`` as it is
        (a row that ended). Entries past ``counts[b]`` are written past the row's length, where the mask
        hides them and later writes replace them.
        """
        b, t = tokens.shape
        if not self.cuda_graphs:
            self._extend(slice(0, b), tokens, features, counts)
            return
        graph = self._graph(
            ("extend", b, t),
            (tokens, features.to(self.dtype), counts),
            lambda tk, ft, ct: self._extend(slice(0, b), tk, ft, ct) or (),
            stateful=True,
        )
        if graph is None:
            self._extend(slice(0, b), tokens, features, counts)

    def _extend(
        self,
        rows: slice | torch.Tensor,
        tokens: torch.Tensor,
        features: torch.Tensor,
        counts: torch.Tensor,
        first: bool = False,
    ) -> None:
        m = self.model
        b, t = tokens.shape
        hidden = m.fc(features.to(self.dtype))  # [B, T, H]
        start = self.num_pairs[rows]  # [B]
        if first:  # a prompt: pairs (fc(f_j), x_{j+1}) for j < n - 1; nothing pending yet
            pair_hidden, pair_tokens, positions = (
                hidden[:, :-1],
                tokens[:, 1:],
                start[:, None] + torch.arange(t - 1, device=self.device),
            )
            added = counts - 1
        else:
            pending = self.pending[rows][:, None]  # [B, 1, H]
            pair_hidden = torch.cat([pending, hidden[:, :-1]], dim=1)
            pair_tokens = tokens
            positions = start[:, None] + torch.arange(t, device=self.device)
            added = counts
        if pair_tokens.shape[1]:
            positions = positions.clamp(max=self.max_len - 1)
            cos, sin = m.rotary(positions)
            x = m.midlayer.attn_input(m.embed(pair_tokens), pair_hidden)
            k, v = m.midlayer.self_attn.project_kv(x, cos, sin)
            self._write(rows, positions, k, v)
        last = (counts - 1).clamp(min=0)
        new_pending = hidden[torch.arange(b, device=self.device), last]  # [B, H]
        keep = (counts > 0)[:, None]
        if isinstance(rows, slice):
            self.pending[rows].copy_(torch.where(keep, new_pending, self.pending[rows]))
            self.num_pairs[rows].add_(added)
        else:
            self.pending.index_copy_(0, rows, torch.where(keep, new_pending, self.pending[rows]))
            self.num_pairs.index_copy_(0, rows, start + added)

    def _write(
        self, rows: slice | torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Scatter [B, kv_heads, T, d] keys/values of rows ``rows`` at ``positions`` [B, T]."""
        b, h, t, d = k.shape
        index = positions[:, None, :, None].expand(b, h, t, d)
        for buf, new in ((self.keys, k), (self.values, v)):
            if isinstance(rows, slice):
                buf[rows].scatter_(2, index, new)
            else:
                part = buf.index_select(0, rows)
                part.scatter_(2, index, new)
                buf.index_copy_(0, rows, part)

    # ------------------------------------------------------------------ drafting (propose: GraphedDrafter)
    def _draft(  # the draft unroll, one step per proposal
        self, anchors: torch.Tensor, steps: int, temperature: float, u: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.model
        layer = m.midlayer
        attn_mod = layer.self_attn
        b = anchors.shape[0]
        rows = slice(0, b)
        keys, values = self.keys[rows], self.values[rows]
        hidden = self.pending[rows][:, None]  # [B, 1, H]
        token = anchors.reshape(b, 1)
        tokens, probs_out = [], []
        for step in range(steps):
            pos = (self.num_pairs[rows] + step).clamp(max=self.max_len - 1)[:, None]  # [B, 1]
            cos, sin = m.rotary(pos)
            x = layer.attn_input(m.embed(token), hidden)
            q = attn_mod.project_q(x, cos, sin)
            k, v = attn_mod.project_kv(x, cos, sin)
            self._write(rows, pos, k, v)  # past the committed pairs: the next extend overwrites it
            attn = sdpa(q, keys[:, :, :kv_len], values[:, :, :kv_len], attention_mask(pos, kv_len))
            hidden = layer.finish(hidden, attn)
            logits = m.logits(hidden)[:, 0].float()  # [B, Vd]
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                choice = inverse_cdf(probs, u[:, step])
                full = torch.zeros(b, self.vocab_size, device=self.device)
                full[:, self.draft_ids] = probs
                probs_out.append(full)
            else:
                choice = logits.argmax(dim=-1)
            token = self.draft_ids[choice][:, None]
            tokens.append(token)
        return torch.cat(tokens, dim=1), torch.stack(probs_out, dim=1) if probs_out else None
