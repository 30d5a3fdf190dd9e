"""Batched block drafting for DFlash and DSpark: one backbone forward proposes a whole block for all ``B`` rows.

The per-sequence :class:`~deepspec.models.dflash.DFlashDrafter` (and its subclass
:class:`~deepspec.models.dspark.DSparkDrafter`) runs one eager block forward per row, with a growable
host-managed cache. :class:`BlockBatchedDrafter` is its counterpart for ``rows`` sequences in lockstep,
built like :class:`~deepspec.eval.eagle3_batched.Eagle3BatchedDrafter`:

* ``keys``/``values`` ``[layers, rows, kv_heads, max_len, head_dim]``: every draft layer's projected
  context keys/values of each row's committed positions ``0..context_len[b]-1`` (the per-row
  drafter's cache). :meth:`extend` writes ``T`` entries per row from ``context_len[b]`` on and advances
  it by ``counts[b]``: entries past the count are hidden by the mask and overwritten later;
* ``context_len`` ``[rows]`` (device): committed positions per row; the anchor's block sits at
  positions ``context_len[b] .. context_len[b] + block_size - 1``.

:meth:`propose` runs the block ``[anchor, MASK x (block_size - 1)]`` of every row through the draft
layers at once: the block's queries attend the row's context keys (a ``[B, 1, block, window + block]``
mask hides keys at or past ``context_len[b]``) and the whole block (bidirectional), exactly the keys
the per-row drafter attends. DFlash's predicting slots give the proposals directly; DSpark's Markov
head then runs left to right over the slots (``B`` rows per step), its bias reading each row's
previous token. DSpark's confidence head is not evaluated: the engine uses the batched drafter only
when nothing reads confidences (no truncation, no scheduler, no recorded rounds; see
:func:`block_batchable`).

Both methods are fixed-shape tensor programs for a given ``(batch, proposals, window)``: no host read,
state updated in place, so on CUDA each shape is captured once as a CUDA graph and replayed
(:class:`~deepspec.eval.graphed_draft.GraphedDrafter`, shared with Eagle3); on the CPU they run
eagerly. Sampled proposals are inverse-CDF draws from uniforms the caller takes from each row's own
generator, so a row never depends on its neighbours; at temperature 0 they are the argmax, as the
per-row drafter's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from deepspec.decode.sampling import inverse_cdf
from deepspec.eval.graphed_draft import GraphedDrafter
from deepspec.models.dflash import DFlashDrafter
from deepspec.models.dspark import DSparkDraft

if TYPE_CHECKING:
    from deepspec.models.dflash import DFlashDraft


def block_batchable(drafter: object, num_proposals: int, record_rounds: bool = False) -> bool:
    """Whether :class:`BlockBatchedDrafter` can stand in for ``drafter`` in the engine's lockstep loop.

    It must be a DFlash/DSpark drafter whose block holds ``num_proposals`` predictions (the engine then
    verifies every row's full ``num_proposals`` slots, as the per-row drafter proposes them), and, for a
    DSpark draft with a confidence head, no per-round records are asked for: the per-row path records
    each round's confidences (calibration data), which the batched step does not compute.
    """
    if not isinstance(drafter, DFlashDrafter):
        return False
    model = drafter.model
    if num_proposals > model.proposals_per_block:
        return False
    return not (record_rounds and getattr(model, "confidence_head", None) is not None)


class BlockBatchedDrafter(GraphedDrafter):
    """``rows`` DFlash/DSpark sequences of up to ``max_len`` committed positions, drafted in lockstep."""

    def __init__(
        self, model: DFlashDraft, rows: int, max_len: int, *, cuda_graphs: bool | None = None
    ) -> None:
        m = model
        attn = m.layers[0].self_attn
        self.model = m
        self.rows, self.max_len = rows, max_len
        self.device = m.param_device
        self.dtype = m.param_dtype
        self._init_graphs(cuda_graphs)
        shape = (m.num_layers, rows, attn.num_kv_heads, max_len, attn.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.context_len = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.markov = isinstance(m, DSparkDraft)  # DSpark: the sequential head runs over the slots

    def _state(self) -> tuple[torch.Tensor, ...]:
        return (self.context_len,)

    def fits(self, rows: int, max_len: int) -> bool:
        return rows <= self.rows and max_len <= self.max_len

    def reset(self) -> None:
        """Forget every row (buffers stay allocated, captured graphs stay valid)."""
        self.context_len.zero_()

    # ------------------------------------------------------------------ committing
    @torch.no_grad()
    def prefill(self, row: int, tokens: torch.Tensor, features: torch.Tensor) -> None:
        """Start row ``row`` from a prompt: tokens [n] and their target features [n, k*H] (eager, once)."""
        n = tokens.numel()
        if n == 0:
            return
        if features.shape[0] != n:
            raise ValueError(f"prefill: {n} tokens but {features.shape[0]} feature rows")
        if n > self.max_len:
            raise ValueError(f"a prompt of {n} tokens does not fit the {self.max_len}-position draft cache")
        self.context_len[row] = 0
        self._extend(
            slice(row, row + 1), features[None].to(self.device), torch.tensor([n], device=self.device)
        )

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, features: torch.Tensor, counts: torch.Tensor) -> None:
        """Commit ``counts[b]`` leading positions of rows ``0..B-1`` with ``features`` [B, T, k*H] (device).

        ``tokens`` [B, T] is the engine's committed ids; a block drafter's context is the target
        features alone (the per-row :meth:`DFlashDrafter.extend` reads only them too). ``counts[b] == 0``
        leaves row ``b`` as it is (a row that ended).
        """
        b = tokens.shape[0]
        if not self.cuda_graphs:
            self._extend(slice(0, b), features, counts)
            return
        graph = self._graph(
            ("extend", b, features.shape[1]),
            (features.to(self.dtype), counts),
            lambda ft, ct: self._extend(slice(0, b), ft, ct) or (),
            stateful=True,
        )
        if graph is None:
            self._extend(slice(0, b), features, counts)

    def _extend(self, rows: slice, features: torch.Tensor, counts: torch.Tensor) -> None:
        m = self.model
        b, t = features.shape[:2]
        ctx = m.context(features)  # [B, T, H]
        positions = (self.context_len[rows][:, None] + torch.arange(t, device=self.device)).clamp(
            max=self.max_len - 1
        )
        rope = m.rotary(positions)
        attn = m.layers[0].self_attn
        index = positions[:, None, :, None].expand(b, attn.num_kv_heads, t, attn.head_dim)
        for i, layer in enumerate(m.layers):
            k, v = layer.self_attn.project_kv(ctx, *rope)
            self.keys[i, rows].scatter_(2, index, k)
            self.values[i, rows].scatter_(2, index, v)
        self.context_len[rows].add_(counts)

    # ------------------------------------------------------------------ drafting (propose: GraphedDrafter)
    def _check_proposals(self, num_proposals: int) -> None:
        per_block = self.model.proposals_per_block
        if num_proposals > per_block:
            raise ValueError(
                f"{num_proposals} proposals asked of a {self.model.algorithm} block that makes {per_block}: "
                f"lower evaluation.num_proposals or use a draft with a larger block_size"
            )

    def _draft(  # one block forward for all rows
        self, anchors: torch.Tensor, steps: int, temperature: float, u: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.model
        b, g = anchors.shape[0], m.block_size
        masks = torch.full((b, g - 1), m.mask_token_id, dtype=torch.long, device=self.device)
        h = m.embed(torch.cat([anchors.reshape(b, 1), masks], dim=1))  # [B, g, H]
        start = self.context_len[:b]
        rope = m.rotary(start[:, None] + torch.arange(g, device=self.device))
        visible = torch.arange(kv_len, device=self.device)[None, :] < start[:, None]  # [B, window]
        block = torch.ones(b, g, dtype=torch.bool, device=self.device)
        mask = torch.cat([visible, block], dim=1)[:, None, None, :].expand(b, 1, g, kv_len + g)
        for i, layer in enumerate(m.layers):
            context = (self.keys[i, :b, :, :kv_len], self.values[i, :b, :, :kv_len])
            h = layer(h, rope, context, mask)
        first = m.first_predicting_slot
        # [B, P, H]: slot first + i predicts the token i + 1 after the anchor
        hidden = m.norm(h)[:, first : first + steps]
        logits = m.target_lm_head(hidden).float()  # [B, P, V]
        if self.markov:
            return self._markov(anchors, logits, temperature, u)
        if temperature <= 0:
            return logits.argmax(dim=-1), None
        probs = torch.softmax(logits / temperature, dim=-1)
        tokens = inverse_cdf(probs.flatten(0, 1), u.flatten()).view(b, steps)
        return tokens, probs

    def _markov(
        self, anchors: torch.Tensor, base: torch.Tensor, temperature: float, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """DSpark's sequential head over the slots, left to right: slot k's logits are the backbone's
        plus the bias of the state after the row's previous token (the anchor for slot 0), as
        :meth:`deepspec.models.dspark.DSparkDrafter._sequential` does for one row."""
        m = self.model
        head = m.markov_head
        b, steps = base.shape[:2]
        prev = anchors.reshape(b)
        state = torch.zeros(b, head.rank, dtype=m.param_dtype, device=self.device)
        tokens, probs_out = [], []
        for k in range(steps):
            e = head.markov_w1(prev)  # [B, r]
            if head.kind == "rnn":
                state = head.rnn(e, state)
                e = state
            logits = base[:, k] + head.bias(e).float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                prev = inverse_cdf(probs, u[:, k])
                probs_out.append(probs)
            else:
                prev = logits.argmax(dim=-1)
            tokens.append(prev)
        return torch.stack(tokens, dim=1), torch.stack(probs_out, dim=1) if probs_out else None
