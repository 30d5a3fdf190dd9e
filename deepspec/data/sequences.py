"""Training data: regenerated JSONL -> rendered token ids + loss masks -> deterministic, resumable batches.

* :func:`load_training_records` keeps records whose ``status`` is ``ok``, or ``truncated`` unless the
  record says ``"train": false`` (the regeneration's drop policy).
* :func:`split_holdout` sets ``data.holdout`` records aside (chosen by a hash of their id): training
  never sees them, and ``deepspec eval --select`` measures each checkpoint's accepted length on them.
* :func:`tokenize_records` renders each conversation with the target's chat template and the
  assistant loss mask (:func:`deepspec.data.template.render_with_mask`).
* :class:`ResumableBatchSampler` walks an endless stream of seeded per-epoch permutations. One
  optimizer step takes the next ``global_batch_size`` sequences, sorts them by length (length
  bucketing: little padding inside a micro-batch), cuts them into micro-batches (a fixed number of
  sequences, or as many as fit a padded-token budget) and deals the micro-batches round-robin to the
  ranks. Every rank computes the same global split, so all ranks run the same number of micro-batches
  (FSDP2 gathers weights in every forward). Its whole state is ``(epoch, index)``, independent of the
  world size, saved in checkpoints for an exact resume (also onto another number of processes).
* Packing (``training.packing``, :class:`PackedShape`): the global batch is instead packed first-fit
  decreasing into rows of one fixed length, several sequences per row, and the rows are grouped into
  micro-batches of a fixed number of rows: every micro-batch is ``[rows, row_length]`` (only a step's
  last ones may hold fewer rows; no all-padding row is computed), and padding is only the unfilled end
  of each row. :func:`pack_batch` lays a micro-batch out with position ids restarting at 0 for each
  sequence.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepspec.data.template import template_kwargs

log = logging.getLogger(__name__)


@dataclass
class TokenizedSequence:
    """One training sequence."""

    id: str
    input_ids: torch.Tensor  # [T] long
    loss_mask: torch.Tensor  # [T] long, 1 = assistant token


@dataclass
class LoadStats:
    kept: int = 0
    skipped_status: int = 0
    bad_lines: int = 0
    no_supervision: int = 0


def load_training_records(path: str | Path, stats: LoadStats | None = None) -> list[dict[str, Any]]:
    """Read a regenerated JSONL file and keep the records that should be trained on."""
    stats = stats if stats is not None else LoadStats()
    records: list[dict[str, Any]] = []
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"regenerated data {p} not found; run `deepspec regenerate` first or set regeneration.output"
        )
    with open(p, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                messages = rec["messages"]
                if not isinstance(messages, list) or not messages:
                    raise ValueError("'messages' must be a non-empty list")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                stats.bad_lines += 1
                log.warning("%s line %d skipped: %s", p, lineno, e)
                continue
            status = rec.get("status", "ok")
            if status == "ok" or (status == "truncated" and rec.get("train", True) is not False):
                rec.setdefault("id", f"line-{lineno}")
                records.append(rec)
                stats.kept += 1
            else:
                stats.skipped_status += 1
    return records


HOLDOUT_SALT = "deepspec-holdout:"


def holdout_count(holdout: float, total: int) -> int:
    """How many of ``total`` records ``data.holdout`` holds out (a count, or a fraction, at least 1)."""
    if holdout <= 0:
        return 0
    n = int(holdout) if holdout >= 1 else max(1, round(holdout * total))
    if n >= total:
        raise ValueError(
            f"data.holdout {holdout} holds out {n} of {total} trainable records, leaving none to train on; "
            "lower data.holdout"
        )
    return n


def split_holdout(
    records: list[dict[str, Any]], holdout: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training records, held-out records), both in file order.

    The held-out records are the ``n`` whose ``sha256(salt + id)`` is smallest: the same set whatever
    the file order, shard or process that reads the file.
    """
    n = holdout_count(holdout, len(records))
    if not n:
        return records, []
    ranked = sorted(records, key=lambda r: hashlib.sha256((HOLDOUT_SALT + str(r["id"])).encode()).hexdigest())
    held_ids = {str(r["id"]) for r in ranked[:n]}
    train = [r for r in records if str(r["id"]) not in held_ids]
    held = [r for r in records if str(r["id"]) in held_ids]
    return train, held


def tokenize_records(
    records: Iterable[dict[str, Any]],
    tokenizer: Any,
    max_length: int,
    chat_template_kwargs: dict[str, Any] | None = None,
    stats: LoadStats | None = None,
    progress: bool = False,
) -> list[TokenizedSequence]:
    """Render each record with its loss mask; records without any supervised token are dropped."""
    from deepspec.data.template import render_with_mask

    stats = stats if stats is not None else LoadStats()
    records = list(records)
    it: Iterable[dict[str, Any]] = records
    if progress:
        from tqdm import tqdm

        it = tqdm(records, desc="tokenize", unit="conv", dynamic_ncols=True)
    out: list[TokenizedSequence] = []
    for rec in it:
        ids, mask = render_with_mask(
            tokenizer,
            rec["messages"],
            chat_template_kwargs=chat_template_kwargs or None,
            max_length=max_length,
        )
        ids_t = torch.as_tensor(list(ids), dtype=torch.long)
        mask_t = torch.as_tensor(list(mask), dtype=torch.long)
        if int(mask_t.sum()) == 0 or ids_t.numel() < 2:
            stats.no_supervision += 1
            continue
        out.append(TokenizedSequence(str(rec["id"]), ids_t, mask_t))
    return out


def token_frequencies(sequences: Iterable[TokenizedSequence], vocab_size: int) -> torch.Tensor:
    """Counts of supervised (assistant) tokens: the basis of Eagle3's reduced draft vocabulary."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in sequences:
        ids = s.input_ids[s.loss_mask.bool()]
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedShape:
    """The fixed shape of every packed micro-batch: ``rows`` rows of ``row_length`` tokens."""

    rows: int
    row_length: int

    @classmethod
    def for_training(
        cls, lengths: list[int], micro_batch_size: int, micro_batch_tokens: int | None
    ) -> PackedShape:
        """Rows as long as the longest sequence (so that any sequence fits a row); as many rows as fit
        ``micro_batch_tokens`` (at least one), or ``micro_batch_size`` rows without a token budget."""
        row_length = max(lengths)
        rows = micro_batch_size if micro_batch_tokens is None else max(1, micro_batch_tokens // row_length)
        return cls(rows, row_length)


def pack_rows(indices: list[int], lengths: list[int], row_length: int) -> list[list[int]]:
    """First-fit decreasing: ``indices`` (any order) into rows of at most ``row_length`` tokens.

    Rows come in the order they were opened; inside a row, sequences keep their placement order (longest
    first). Deterministic: ties keep the order of ``indices``.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda j: -lengths[j]):
        n = lengths[i]
        if n > row_length:
            raise ValueError(f"sequence {i} has {n} tokens, more than the packed row length {row_length}")
        r = next((r for r, free in enumerate(room) if free >= n), None)
        if r is None:
            rows.append([i])
            room.append(row_length - n)
        else:
            rows[r].append(i)
            room[r] -= n
    return rows


class ResumableBatchSampler:
    """Deterministic global batches over seeded epoch permutations, with a resumable ``(epoch, index)``.

    ``micro_batch_tokens`` (optional) sizes micro-batches by padded tokens instead of a fixed count
    (``micro_batch_size`` is then unused): the length-sorted global batch is cut greedily so that
    ``rows x longest row <= micro_batch_tokens`` (a longer single sequence forms a micro-batch of its own).
    """

    def __init__(
        self,
        lengths: list[int],
        global_batch_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        micro_batch_tokens: int | None = None,
        packed: PackedShape | None = None,
    ):
        """``packed``: pack each global batch into micro-batches of this fixed shape (use
        :meth:`next_packed_global_batch`); ``micro_batch_size`` / ``micro_batch_tokens`` are then unused."""
        if not lengths:
            raise ValueError("no training sequences: the dataset is empty after filtering")
        if (
            packed is None
            and micro_batch_tokens is None
            and global_batch_size % (micro_batch_size * world_size)
        ):
            raise ValueError(
                f"training.global_batch_size {global_batch_size} must be a multiple of "
                f"micro_batch_size x world_size = {micro_batch_size} x {world_size}"
            )
        if global_batch_size % world_size:
            raise ValueError(
                f"training.global_batch_size {global_batch_size} must be a multiple of the {world_size} processes"
            )
        self.lengths = lengths
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.packed = packed
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.index = 0, 0
        self._perm_epoch = -1
        self._perm: list[int] = []

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per rank and step with a fixed micro-batch size (varies with a token budget)."""
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.lengths), generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def next_global_batch(self) -> list[list[int]]:
        """This rank's micro-batches (lists of dataset indices) for the next optimizer step."""
        if self.packed is not None:
            raise RuntimeError("a packing sampler hands out rows: call next_packed_global_batch()")
        micro = self._split(self._next_chosen())
        return micro[self.rank :: self.world_size]

    def next_packed_global_batch(self) -> list[list[list[int]]]:
        """This rank's packed micro-batches for the next optimizer step: each a list of at most
        ``packed.rows`` rows, each row a list of dataset indices whose lengths sum to at most
        ``packed.row_length``. Every rank gets the same number of micro-batches."""
        if self.packed is None:
            raise RuntimeError("this sampler does not pack: call next_global_batch()")
        shape = self.packed
        rows = pack_rows(self._next_chosen(), self.lengths, shape.row_length)
        # a multiple of world_size micro-batches, none empty: split the fullest rows while too few rows
        count = -(-len(rows) // shape.rows)
        count = -(-count // self.world_size) * self.world_size
        while len(rows) < count:
            k = max(range(len(rows)), key=lambda j: len(rows[j]))
            half = (len(rows[k]) + 1) // 2
            rows[k : k + 1] = [rows[k][:half], rows[k][half:]]
        # full micro-batches of shape.rows rows first, keeping one row at least for each of the rest (no
        # all-padding row is ever computed: a step's last micro-batches may hold fewer rows)
        micro: list[list[list[int]]] = []
        at = 0
        for m in range(count):
            take = min(shape.rows, len(rows) - at - (count - 1 - m))
            micro.append(rows[at : at + take])
            at += take
        return micro[self.rank :: self.world_size]

    def _next_chosen(self) -> list[int]:
        """The next ``global_batch_size`` dataset indices, longest first."""
        chosen: list[int] = []
        while len(chosen) < self.global_batch_size:
            perm = self._permutation(self.epoch)
            take = min(self.global_batch_size - len(chosen), len(perm) - self.index)
            chosen.extend(perm[self.index : self.index + take])
            self.index += take
            if self.index >= len(perm):
                self.epoch, self.index = self.epoch + 1, 0
        # Length bucketing inside the global batch (stable sort: ties keep the permutation order).
        chosen.sort(key=lambda i: -self.lengths[i])
        return chosen

    def _split(self, chosen: list[int]) -> list[list[int]]:
        """Cut the length-sorted global batch into micro-batches, a multiple of ``world_size`` of them."""
        budget = self.micro_batch_tokens
        if budget is None:
            m = self.micro_batch_size
            return [chosen[j : j + m] for j in range(0, len(chosen), m)]
        micro: list[list[int]] = []
        for i in chosen:  # longest first: a micro-batch's padded length is its first sequence's
            if micro and (len(micro[-1]) + 1) * self.lengths[micro[-1][0]] <= budget:
                micro[-1].append(i)
            else:
                micro.append([i])
        while len(micro) % self.world_size:  # every rank must run the same number of micro-batches
            k = max(range(len(micro)), key=lambda j: len(micro[j]))
            half = (len(micro[k]) + 1) // 2
            micro[k : k + 1] = [micro[k][:half], micro[k][half:]]
        return micro

    @property
    def epoch_float(self) -> float:
        return self.epoch + self.index / len(self.lengths)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def pad_batch(sequences: list[TokenizedSequence], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids, attention_mask, loss_mask, each [B, T]."""
    t = max(int(s.input_ids.numel()) for s in sequences)
    b = len(sequences)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    attn = torch.zeros((b, t), dtype=torch.long)
    loss = torch.zeros((b, t), dtype=torch.long)
    for i, s in enumerate(sequences):
        n = s.input_ids.numel()
        ids[i, :n], attn[i, :n], loss[i, :n] = s.input_ids, 1, s.loss_mask
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def pack_batch(
    rows: list[list[TokenizedSequence]], shape: PackedShape, pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """Lay packed rows out as one ``[len(rows), shape.row_length]`` micro-batch (at most ``shape.rows``).

    Returns input_ids, attention_mask (0 on each row's unfilled end), loss_mask and
    position_ids: each sequence's positions restart at 0, and a row's unfilled end counts as one more
    sequence (positions 0, 1, ...), so nothing real attends to it or from it.
    """
    if len(rows) > shape.rows:
        raise ValueError(f"{len(rows)} rows do not fit a packed micro-batch of {shape.rows}")
    r, t = len(rows), shape.row_length
    ids = torch.full((r, t), pad_id, dtype=torch.long)
    attn = torch.zeros((r, t), dtype=torch.long)
    loss = torch.zeros((r, t), dtype=torch.long)
    pos = torch.arange(t).repeat(r, 1)
    for i, row in enumerate(rows):
        at = 0
        for s in row:
            n = s.input_ids.numel()
            if at + n > t:
                raise ValueError(f"row {i} holds more than {t} tokens")
            ids[i, at : at + n], attn[i, at : at + n], loss[i, at : at + n] = s.input_ids, 1, s.loss_mask
            pos[i, at : at + n] = torch.arange(n)
            at += n
        pos[i, at:] = torch.arange(t - at)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss, "position_ids": pos}


def load_sequences(recipe: Any, tokenizer: Any, progress: bool = False) -> list[TokenizedSequence]:
    """Regenerated JSONL of the recipe -> tokenized training sequences (with loss masks)."""
    from deepspec.layout import RunLayout

    layout = RunLayout.from_recipe(recipe)
    path = layout.local_input(layout.regenerated)
    stats = LoadStats()
    records, held = split_holdout(load_training_records(path, stats), recipe.data.holdout)
    if held:
        log.info("%d record(s) held out of training for checkpoint selection (data.holdout)", len(held))
    if recipe.data.max_samples:
        records = records[: recipe.data.max_samples]
    seqs = tokenize_records(
        records,
        tokenizer,
        recipe.data.max_length,
        template_kwargs(recipe.regeneration),
        stats,
        progress=progress,
    )
    if not seqs:
        raise ValueError(
            f"no trainable sequences in {path}: {stats.kept} records kept, {stats.skipped_status} skipped by "
            f"status, {stats.bad_lines} unreadable, {stats.no_supervision} without assistant tokens"
        )
    return seqs
