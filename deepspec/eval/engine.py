"""Speculative decoding engine (batch size 1) and the plain target-only decode it is compared with.

One round, with committed tokens ``x_0..x_t`` whose target KV entries are cached except the anchor
``x_t`` (the last committed token)::

    proposal = drafter.propose(anchor=x_t)              # d_1..d_g  (+ q_1..q_g, confidences)
    [optional] truncate g by confidence threshold / prefix scheduler (draft-only information)
    out = target.capture([x_t, d_1..d_g], past_key_values=cache, use_cache=True)
    a, b = verify(d, q, logits(out))                    # exact rejection sampling (greedy at T = 0)
    cache.crop(len(prefix) + 1 + a)                     # keep x_t, d_1..d_a; the prefix is never recomputed
    drafter.extend([x_t, d_1..d_a], out.features[:1 + a])
    commit d_1..d_a, b; the anchor becomes b

The target's own decode (:meth:`SpeculativeEngine.generate_plain`) uses the same prefill and
KV-cache path, one token per forward, so the speedup compares like with like.

Two KV-cache paths (``EngineConfig.kv_cache``):

* ``"static"`` (default): the decode core of :mod:`deepspec.decode`: a static cache whose rows
  advance independently, verification and sampling on the device with per-row random streams, and
  CUDA graphs for the fixed-size steps on a GPU. :meth:`SpeculativeEngine.generate_batch` runs
  prompts in ``B`` rows in lockstep (per-row acceptance); with more prompts than rows, a row whose
  prompt ended takes the next waiting prompt right away (prefill of that row, its drafter started
  from the prompt), so rows do not idle until the longest answer of a fixed batch ends. A row's tokens
  depend neither on the rows beside it nor on when it was admitted, so ``generate`` is
  ``generate_batch`` of one prompt. Eagle3 drafts every row in one forward per step
  (:mod:`deepspec.eval.eagle3_batched`: on the device and, on CUDA, as captured graphs), DFlash and
  DSpark one block forward for all rows (:mod:`deepspec.eval.block_batched`); other drafters run
  one instance per row.
* ``"dynamic"``: the eager reference path (transformers' dynamic cache, cropped after each round,
  one prompt at a time), kept to check the static path against.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from deepspec.decode.sampling import row_uniforms, sample_rows, verify_rows
from deepspec.eval.eagle3_batched import batched_drafter, has_batched_drafter
from deepspec.eval.kv_cache import crop_cache
from deepspec.eval.metrics import AcceptanceStats
from deepspec.eval.sampling import sample_token, verify

PLAIN_CHUNK = 16  # plain decoding steps queued on the device between two host reads

if TYPE_CHECKING:
    from deepspec.decode.core import DecodeCore
    from deepspec.eval.calibration import Calibration
    from deepspec.eval.scheduler import PrefixScheduler
    from deepspec.models.base import SpeculativeDrafter
    from deepspec.target_model.model import TargetModel


@dataclass
class EngineConfig:
    """Decoding parameters (defaults follow the reference evaluation protocol)."""

    num_proposals: int = 7
    temperature: float = 1.0
    max_new_tokens: int = 2048
    stop_token_ids: tuple[int, ...] = ()
    confidence_threshold: float | None = None  # drop slots whose prefix survival falls below this
    record_rounds: bool = False  # keep per-round confidences/acceptance (calibration data)
    kv_cache: Literal["static", "dynamic"] = "static"  # decode core, or the eager reference path
    cuda_graphs: bool | None = None  # None = on CUDA; only with kv_cache="static"
    # drafters with a batched counterpart (Eagle3, DFlash, DSpark: deepspec.eval.eagle3_batched.batched_drafter)
    # draft all rows in one forward
    batched_drafter: bool = True


@dataclass
class RoundRecord:
    proposed: int
    accepted: int
    confidence: list[float] | None  # the drafter's raw confidences for all proposed slots (before truncation)
    raw_proposed: int  # slots proposed before truncation


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens, the stop token included when one was hit
    finish_reason: Literal["stop", "length"]
    stats: AcceptanceStats
    prefill_seconds: float
    rounds: list[RoundRecord] = field(default_factory=list)


@dataclass
class BatchCounts:
    """What a batched call did (``SpeculativeEngine.last_batch``)."""

    steps: int = 0  # target steps: verification rounds, or plain decoding steps
    refills: int = 0  # prompts admitted into a row after an earlier prompt of that row ended


class _Flight:
    """The prompts of one batched call and the cache rows decoding them.

    Prompts are admitted in order; the row-indexed lists describe each row's current prompt
    (``who[row]``, None for a row that idles because no prompt is left).
    """

    def __init__(
        self, prompts: list[torch.Tensor], generators: list[torch.Generator | None], rows: int, plain: bool
    ) -> None:
        self.prompts = prompts
        self.generators = generators
        self.plain = plain
        self.results: list[GenerationResult] = [None] * len(prompts)  # type: ignore[list-item]
        self.waiting = 0  # the next prompt to admit
        self.admit_seconds = 0.0
        self.counts = BatchCounts()
        self.who: list[int | None] = [None] * rows
        self.lengths = [0] * rows  # tokens of the row's sequence in the cache (the next position)
        self.anchors = [0] * rows  # the last committed token, not yet in the cache
        self.outs: list[list[int]] = [[] for _ in range(rows)]
        self.reasons: list[str | None] = [None] * rows
        self.stats = [AcceptanceStats() for _ in range(rows)]
        self.records: list[list[RoundRecord]] = [[] for _ in range(rows)]
        self.gens: list[torch.Generator | None] = [None] * rows
        self.private: list[torch.Generator | None] = [None] * rows  # plain decoding's streams
        self.prefill_seconds = [0.0] * rows

    def active(self) -> list[int]:
        return [r for r, i in enumerate(self.who) if i is not None and self.reasons[r] is None]

    def start(self, row: int, index: int, anchor: int, private: torch.Generator | None) -> None:
        """Prompt ``index`` (prefilled into ``row``) starts with its first token ``anchor``."""
        if self.who[row] is not None:  # the row held an earlier prompt
            self.counts.refills += 1
        self.who[row] = index
        self.lengths[row] = int(self.prompts[index].numel())
        self.anchors[row] = anchor
        self.outs[row] = []
        self.reasons[row] = None
        self.stats[row] = AcceptanceStats(prompts=1)
        self.records[row] = []
        self.gens[row] = self.generators[index]
        self.private[row] = private

    def finish(self, row: int) -> None:
        """Keep the result of the prompt that ended in ``row``."""
        index = self.who[row]
        assert index is not None
        stats = self.stats[row]
        stats.new_tokens = len(self.outs[row]) - 1  # tokens produced after the prefill's first token
        reason: Any = self.reasons[row] or "length"  # "stop" or "length"
        self.results[index] = GenerationResult(
            self.outs[row], reason, stats, self.prefill_seconds[row], self.records[row]
        )

    def idle(self, row: int) -> None:
        """No prompt is left for ``row``: its steps are ignored, at position 0 (a small attention window)."""
        self.who[row] = None
        self.lengths[row] = 0


def prompt_seed(seed: int, benchmark: str, index: int) -> int:
    """A stable 63-bit seed for (seed, benchmark, prompt index): independent of process count/order."""
    digest = hashlib.sha256(f"{seed}:{benchmark}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def prompt_generator(
    seed: int, benchmark: str, index: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(prompt_seed(seed, benchmark, index))
    return gen


def _private_generator(parent: torch.Generator | None, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded by one draw from ``parent`` (the global RNG when None)."""
    where = parent.device if parent is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2**62, (1,), generator=parent, device=where))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


class SpeculativeEngine:
    """Drives a frozen target and a :class:`SpeculativeDrafter` (Eagle3, DFlash, DSpark, n-gram...)."""

    def __init__(
        self,
        target: TargetModel,
        drafter: SpeculativeDrafter | None,
        config: EngineConfig | None = None,
        scheduler: PrefixScheduler | None = None,
        calibration: Calibration | None = None,
        drafter_factory: Callable[[], SpeculativeDrafter] | None = None,
    ) -> None:
        self.target = target
        self.drafter = drafter
        self.config = config or EngineConfig()
        if self.config.kv_cache not in ("static", "dynamic"):
            raise ValueError(f"kv_cache must be 'static' or 'dynamic', got {self.config.kv_cache!r}")
        self.scheduler = scheduler
        self.calibration = calibration
        self.drafter_factory = drafter_factory  # more drafters for batched decoding (one per row)
        self.device = target.lm_head.weight.device
        self.core: DecodeCore | None = None
        self.last_batch = BatchCounts()  # steps and refills of the last batched call
        self._batched: Any = None  # the batched drafter sized for self.core (see _batched_drafter)

    # ------------------------------------------------------------------ helpers
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _prefill(self, prompt: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
        out = self.target.capture(prompt[None], use_cache=True)
        logits = self.target.compute_logits(out.last_hidden[0, -1:])[0]  # [V]
        return out.past_key_values, out.features[0], logits

    def _finish(self, tokens: list[int]) -> tuple[list[int], str | None]:
        """Cut at the first stop token / max_new_tokens; return the reason when generation ends."""
        stops = set(self.config.stop_token_ids)
        for i, t in enumerate(tokens):
            if t in stops and i < self.config.max_new_tokens:
                return tokens[: i + 1], "stop"
        if len(tokens) >= self.config.max_new_tokens:
            return tokens[: self.config.max_new_tokens], "length"
        return tokens, None

    def _append(self, tokens: list[int], new: list[int]) -> str | None:
        """Append ``new`` up to the first stop token or ``max_new_tokens`` (as :meth:`_finish`, without
        rescanning what is already there); return the reason when generation ends."""
        stops = self.config.stop_token_ids
        for t in new:
            tokens.append(t)
            if t in stops:
                return "stop"
            if len(tokens) >= self.config.max_new_tokens:
                return "length"
        return None

    def _truncate(self, num: int, confidence: torch.Tensor | None) -> int:
        """How many proposed slots to verify: confidence threshold, then the prefix scheduler."""
        if confidence is None:
            return num
        conf = confidence[:num].detach().float()
        if self.calibration is not None:
            conf = self.calibration.apply(conf)
        keep = num
        if self.config.confidence_threshold is not None:
            survival = torch.cumprod(conf.clamp(0, 1), dim=0)
            below = (survival < self.config.confidence_threshold).nonzero()
            if below.numel():
                keep = int(below[0])
        if self.scheduler is not None:
            keep = min(keep, self.scheduler.choose(conf))
        return keep

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate(
        self, prompt_ids: list[int] | torch.Tensor, generator: torch.Generator | None = None
    ) -> GenerationResult:
        """Speculative decode of one prompt."""
        if self.config.kv_cache == "dynamic":
            return self._generate_dynamic(prompt_ids, generator)
        return self.generate_batch([prompt_ids], [generator])[0]

    @torch.no_grad()
    def generate_plain(
        self, prompt_ids: list[int] | torch.Tensor, generator: torch.Generator | None = None
    ) -> GenerationResult:
        """Target-only decode, one token per forward, same prefill and KV-cache path (the baseline)."""
        if self.config.kv_cache == "dynamic":
            return self._generate_plain_dynamic(prompt_ids, generator)
        return self.generate_plain_batch([prompt_ids], [generator])[0]

    @torch.no_grad()
    def generate_batch(
        self,
        prompts: Sequence[list[int] | torch.Tensor],
        generators: Sequence[torch.Generator | None] | None = None,
        drafters: Sequence[SpeculativeDrafter] | None = None,
        rows: int | None = None,
    ) -> list[GenerationResult]:
        """Speculative decode of the prompts in ``rows`` cache rows (default: one per prompt), results
        in prompt order.

        With fewer rows than prompts, a row whose prompt ended takes the next waiting prompt at once
        (no row idles until the longest of a fixed batch ends); a prompt's result does not depend on
        the rows beside it nor on when it was admitted. Drafters: ``drafters`` (one per row) if given,
        else the engine's drafter for row 0 and ``drafter_factory()`` for the others. Every row
        verifies ``num_proposals`` slots per round (shorter proposals are padded and masked), so one
        step shape serves the whole run.
        """
        if self.drafter is None and drafters is None:
            raise ValueError(
                "SpeculativeEngine.generate needs a drafter; use generate_plain for the target alone"
            )
        if drafters is None and self._batched_drafter_usable():
            return self._lockstep(prompts, generators, None, batched=True, rows=rows)
        width = len(prompts) if rows is None else min(rows, len(prompts))
        if drafters is None:
            if width > 1 and self.drafter_factory is None:
                raise ValueError(
                    f"batched decoding in {width} rows needs one drafter per row: "
                    "pass drafters=[...] or build the engine with drafter_factory"
                )
            drafters = [self.drafter, *(self.drafter_factory() for _ in range(width - 1))]
        return self._lockstep(prompts, generators, list(drafters), rows=rows)

    @torch.no_grad()
    def generate_plain_batch(
        self,
        prompts: Sequence[list[int] | torch.Tensor],
        generators: Sequence[torch.Generator | None] | None = None,
        rows: int | None = None,
    ) -> list[GenerationResult]:
        """Target-only decode of the prompts in ``rows`` cache rows on the same core (the batched
        baseline), refilled as :meth:`generate_batch` refills them."""
        return self._lockstep(prompts, generators, None, rows=rows)

    # ------------------------------------------------------------------ static path
    def _batched_drafter_usable(self) -> bool:
        """Whether the engine's drafter drafts all rows in one forward (and nothing needs per-row proposals:
        confidence truncation and the prefix scheduler read per-row confidences it does not make)."""
        return (
            self.config.batched_drafter
            and has_batched_drafter(self.drafter, self.config.num_proposals, self.config.record_rounds)
            and self.config.confidence_threshold is None
            and self.scheduler is None
        )

    def _batched_drafter(self, core: DecodeCore) -> Any:
        """The batched drafter sized like ``core`` (rebuilt with it, so its graphs live as long as the core's)."""
        if self._batched is None or self._batched[0] is not core:
            self._batched = None  # free the old draft cache first
            made = batched_drafter(self.drafter, core.rows, core.max_len, self.config.cuda_graphs)
            self._batched = (core, made)
        return self._batched[1]

    def _active_uniforms(
        self, generators: list[torch.Generator | None], active: list[int], n: int, k: int
    ) -> torch.Tensor:
        """``[n, k]`` uniforms, drawn from the generators of the ``active`` rows only (zeros elsewhere),
        so a row's stream does not move once it ended."""
        u = row_uniforms([generators[b] for b in active], k, self.device)
        if len(active) < n:
            full = torch.zeros(n, k, device=self.device)
            full[torch.tensor(active, device=self.device)] = u
            u = full
        return u

    def _core(self, rows: int, max_len: int) -> DecodeCore:
        """The decode core, grown (never shrunk) to ``rows`` x ``max_len``; graphs are kept while it fits."""
        from deepspec.decode.core import DecodeCore

        if self.core is None or not self.core.fits(rows, max_len):
            old = self.core
            rows = max(rows, old.rows if old else 0)
            max_len = max(-(-max_len // 256) * 256, old.max_len if old else 0)
            self.core = None  # free the old cache first
            del old
            self.core = DecodeCore(self.target, rows, max_len, cuda_graphs=self.config.cuda_graphs)
        return self.core

    def _lockstep(
        self,
        prompt_list: Sequence[list[int] | torch.Tensor],
        generators: Sequence[torch.Generator | None] | None,
        drafters: list[SpeculativeDrafter] | None,
        batched: bool = False,
        rows: int | None = None,
    ) -> list[GenerationResult]:
        """Decode the prompts in at most ``rows`` cache rows (default: all at once), refilling each row
        with the next waiting prompt as soon as its prompt ends; rounds of (propose per row, one batched
        verify step) until every prompt has ended.

        ``batched``: the engine's drafter proposes for all rows in one forward per step
        (:meth:`_batched_drafter`) instead of ``drafters`` (one per row). Plain decoding
        (:meth:`_plain_steps`) admits prompts the same way, with no draft slots. One host transfer per
        round carries every row's accepted count and next token back; a row whose prompt ended takes
        the next waiting prompt right after that read (:meth:`_admit`), or idles (its step results
        ignored) when none is left. The row count stays fixed, so the step shapes (and CUDA graphs)
        do not change while rows are refilled.

        Timing: each admission (prefill of the admitted prompts, their first token, the drafters'
        prefill) is timed on its own and is the ``prefill_seconds`` of the prompts it admitted. The
        rest of the wall time of the call is the decode; it is shared among the prompts in proportion
        to the tokens each produced, so summed over prompts ``decode_seconds`` is the decode wall time
        and tokens / seconds is the batch's throughput.
        """
        cfg = self.config
        n = len(prompt_list)
        if n == 0:
            return []
        generators = list(generators) if generators is not None else [None] * n
        if len(generators) != n:
            raise ValueError(f"{len(generators)} generators for {n} prompts")
        prompts = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompt_list]
        if any(p.numel() == 0 for p in prompts):
            raise ValueError("empty prompt: at least one token is needed")
        width = n if rows is None else min(rows, n)
        if width < 1:
            raise ValueError(f"rows must be positive, got {rows}")
        if drafters is not None and len(drafters) != width:
            raise ValueError(f"{len(drafters)} drafters for {width} rows")
        drafting = drafters is not None or batched
        slots = cfg.num_proposals if drafting else 0
        sampling = cfg.temperature > 0
        core = self._core(width, max(int(p.numel()) for p in prompts) + cfg.max_new_tokens + slots + 2)
        bdraft = self._batched_drafter(core) if batched else None
        flight = _Flight(prompts, generators, width, plain=not drafting)
        self.last_batch = flight.counts

        self._sync()
        t0 = time.perf_counter()
        if bdraft is not None:
            bdraft.reset()
        self._admit(flight, list(range(width)), core, drafters, bdraft)
        if not drafting:
            self._plain_steps(core, flight)
        anchors_dev = torch.tensor(flight.anchors, device=self.device)
        offsets = torch.arange(slots + 1, device=self.device)
        vocab = self.target.vocab_size
        lengths, anchors, outs, reasons = flight.lengths, flight.anchors, flight.outs, flight.reasons
        stats, records, gens = flight.stats, flight.records, flight.gens
        while active := flight.active():
            flight.counts.steps += 1
            drafts = [[] for _ in range(width)]
            kept = [0] * width
            per_row_probs = sampling and slots and bdraft is None
            probs = torch.zeros(width, slots, vocab, device=self.device) if per_row_probs else None
            if bdraft is not None:  # every row in one forward per step; tokens stay on the device
                u_draft = self._active_uniforms(gens, active, width, slots) if sampling else None
                needed = max(lengths) - 1 + slots  # committed pairs + proposals of the longest row
                proposal = bdraft.propose(anchors_dev, slots, cfg.temperature, u_draft, needed)
                probs = proposal.probs
                kept = [slots] * width
                ids = torch.cat(
                    [anchors_dev[:, None], proposal.tokens], dim=1
                )  # a copy: graph outputs are reused
                for b in active if cfg.record_rounds else ():
                    records[b].append(RoundRecord(slots, 0, None, slots))
            for b in active if drafters is not None else ():
                proposal = drafters[b].propose(anchors[b], slots, cfg.temperature, gens[b])
                raw_g = min(int(proposal.tokens.numel()), slots)
                g = self._truncate(raw_g, proposal.confidence)
                drafts[b] = proposal.tokens[:g].tolist()
                kept[b] = g
                if probs is not None and g:
                    probs[b, :g] = proposal.probs[:g].to(self.device, torch.float32)
                if cfg.record_rounds:
                    conf = proposal.confidence
                    records[b].append(
                        RoundRecord(
                            g, 0, conf[:raw_g].float().cpu().tolist() if conf is not None else None, raw_g
                        )
                    )
            if bdraft is None:
                ids_host = [[anchors[b], *drafts[b], *[0] * (slots - kept[b])] for b in range(width)]
                ids = torch.tensor(ids_host, device=self.device)
            start = torch.tensor(lengths, device=self.device)
            out = core.step(ids, start[:, None] + offsets, max(lengths) + slots + 1)
            # rows that ended draw nothing (their streams stay put)
            u = self._active_uniforms(gens, active, width, slots + 1) if sampling else None
            accepted, nxt = verify_rows(
                ids[:, 1:], torch.tensor(kept, device=self.device), probs, out.logits, cfg.temperature, u
            )
            if bdraft is not None:
                # commit anchor + accepted drafts of the active rows, on the device, before the host read
                live = torch.zeros(width, dtype=torch.long, device=self.device)
                live[torch.tensor(active, device=self.device)] = 1
                bdraft.extend(ids, out.features, (1 + accepted) * live)
                anchors_dev = nxt
                host = torch.cat([accepted[:, None], nxt[:, None], ids], dim=1).tolist()
                acc_host, next_host = [r[0] for r in host], [r[1] for r in host]
                ids_host = [r[2:] for r in host]
                drafts = [r[1:] for r in ids_host]
            else:
                acc_host, next_host = torch.stack([accepted, nxt]).tolist()
            ended = []
            for b in active:
                a = acc_host[b]
                stats[b].add_round(kept[b], a)
                if cfg.record_rounds and drafting:
                    records[b][-1].accepted = a
                lengths[b] += 1 + a
                reasons[b] = self._append(outs[b], [*drafts[b][:a], next_host[b]])
                anchors[b] = next_host[b]
                if reasons[b] is not None:
                    ended.append(b)
                elif drafters is not None:
                    # host tokens (no device read); a copy of the features, since a replayed graph
                    # overwrites its output buffers at the next step
                    committed = torch.tensor([ids_host[b][0], *drafts[b][:a]])
                    drafters[b].extend(committed, out.features[b, : 1 + a].clone())
            if ended and self._admit(flight, ended, core, drafters, bdraft) and bdraft is not None:
                anchors_dev = torch.tensor(anchors, device=self.device)  # the refilled rows' first tokens
        self._sync()
        wall = time.perf_counter() - t0 - flight.admit_seconds
        results = flight.results
        total_new = sum(r.stats.new_tokens for r in results)
        for r in results:
            # the decode time, shared in proportion to the tokens each prompt produced, so that summed
            # over prompts tokens / seconds is the batch's throughput
            r.stats.decode_seconds = wall * (r.stats.new_tokens / total_new if total_new else 1.0 / n)
        return results

    def _admit(
        self,
        flight: _Flight,
        free: list[int],
        core: DecodeCore,
        drafters: list[SpeculativeDrafter] | None,
        bdraft: Any,
    ) -> list[int]:
        """Finish the prompts of rows ``free`` (if any) and admit waiting prompts into those rows.

        The admitted prompts are prefilled in one batch into their rows of the core; each one's first
        token is drawn with one uniform from its own generator (for plain decoding, one more draw seeds
        its private stream, see :meth:`_plain_steps`), and its row's drafter starts from the prompt. A
        prompt that ends at its first token is finished at once and its row admits the next. Rows left
        without a prompt idle. Returns the rows that got a prompt still decoding.
        """
        cfg = self.config
        filled: list[int] = []
        for row in free:
            if flight.who[row] is not None:
                flight.finish(row)
        while free and flight.waiting < len(flight.prompts):
            self._sync()
            t0 = time.perf_counter()
            take = free[: len(flight.prompts) - flight.waiting]
            free = free[len(take) :]  # rows no prompt is left for
            new = list(range(flight.waiting, flight.waiting + len(take)))
            flight.waiting += len(take)
            prompts = [flight.prompts[i] for i in new]
            logits, features = core.prefill(take, prompts)
            gens = [flight.generators[i] for i in new]
            u = row_uniforms(gens, 1, self.device)[:, 0] if cfg.temperature > 0 else None
            anchors = sample_rows(logits, cfg.temperature, u).tolist()
            for k, (row, i) in enumerate(zip(take, new, strict=True)):
                private = None
                if flight.plain and cfg.temperature > 0:
                    private = _private_generator(gens[k], self.device)
                flight.start(row, i, anchors[k], private)
                flight.reasons[row] = self._append(flight.outs[row], [anchors[k]])
                if drafters is not None:
                    drafters[row].reset()
                    drafters[row].extend(prompts[k].to(self.device), features[k])
                if bdraft is not None:
                    bdraft.prefill(row, prompts[k].to(self.device), features[k])
            self._sync()
            seconds = time.perf_counter() - t0
            flight.admit_seconds += seconds
            for row in take:
                flight.prefill_seconds[row] = seconds
            done = [row for row in take if flight.reasons[row] is not None]
            filled += [row for row in take if flight.reasons[row] is None]
            for row in done:
                flight.finish(row)
            free = done + free
        for row in free:
            flight.idle(row)
        return filled

    def _plain_steps(self, core: DecodeCore, flight: _Flight) -> None:
        """Plain decoding without a host round trip per token.

        Each step's input is the previous step's sampled token, still on the device, so steps are
        queued back to back and the host reads the tokens after ``PLAIN_CHUNK`` steps, or earlier when a
        row reaches ``max_new_tokens``, to apply stop tokens and lengths; rows whose prompt ended then
        take the next waiting prompts (:meth:`_admit`), so a row idles at most until that read. Tokens a
        row produced after its prompt's end are discarded. A prompt's draws come from a private
        generator seeded by one draw from its own generator at admission, so the
        caller's generator advances by the same amount whatever the chunking and the batch (a later
        turn of the same prompt then starts from the same state).
        """
        cfg = self.config
        sampling = cfg.temperature > 0
        token = torch.tensor(flight.anchors, device=self.device)
        while active := flight.active():
            position = torch.tensor(flight.lengths, device=self.device)
            longest = max(flight.lengths)
            # up to the nearest length limit: a row that ends by length is refilled at once
            left = min(cfg.max_new_tokens - len(flight.outs[b]) for b in active)
            produced = []
            for _ in range(min(PLAIN_CHUNK, left)):
                flight.counts.steps += 1
                longest += 1
                out = core.step(token[:, None], position[:, None], longest)
                u = row_uniforms(flight.private, 1, self.device)[:, 0] if sampling else None
                token = sample_rows(out.logits[:, 0], cfg.temperature, u)
                position = position + 1
                produced.append(token)
            ended = []
            host = torch.stack(produced, dim=1).tolist()
            for b in active:
                for t in host[b]:
                    flight.stats[b].add_round(0, 0)
                    flight.lengths[b] += 1
                    flight.reasons[b] = self._append(flight.outs[b], [t])
                    if flight.reasons[b] is not None:
                        ended.append(b)
                        break
            refilled = self._admit(flight, ended, core, None, None) if ended else []
            if refilled:
                token = token.clone()
                token[torch.tensor(refilled, device=self.device)] = torch.tensor(
                    [flight.anchors[b] for b in refilled], device=self.device
                )

    # ------------------------------------------------------------------ dynamic (eager reference) path
    @torch.no_grad()
    def _generate_dynamic(
        self, prompt_ids: list[int] | torch.Tensor, generator: torch.Generator | None = None
    ) -> GenerationResult:
        """Speculative decode of one prompt on transformers' dynamic cache (the eager reference)."""
        if self.drafter is None:
            raise ValueError(
                "SpeculativeEngine.generate needs a drafter; use generate_plain for the target alone"
            )
        cfg = self.config
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.device).reshape(-1)
        if prompt.numel() == 0:
            raise ValueError("empty prompt: at least one token is needed")
        stats = AcceptanceStats(prompts=1)
        records: list[RoundRecord] = []
        self.drafter.reset()

        self._sync()
        t0 = time.perf_counter()
        cache, features, logits = self._prefill(prompt)
        anchor = sample_token(logits, cfg.temperature, generator)
        self.drafter.extend(prompt, features)
        self._sync()
        t1 = time.perf_counter()

        out_tokens, reason = self._finish([anchor])
        committed_len = prompt.numel()  # tokens whose KV entries are in the target cache
        while reason is None:
            proposal = self.drafter.propose(anchor, cfg.num_proposals, cfg.temperature, generator)
            raw_g = min(int(proposal.tokens.numel()), cfg.num_proposals)
            g = self._truncate(raw_g, proposal.confidence)
            draft = proposal.tokens[:g].to(self.device, torch.long)
            ids = torch.cat([torch.tensor([anchor], device=self.device), draft])[None]  # [1, g + 1]
            out = self.target.capture(ids, past_key_values=cache, use_cache=True)
            target_logits = self.target.compute_logits(out.last_hidden[0])  # [g + 1, V]
            result = verify(draft, proposal.probs[:g], target_logits, cfg.temperature, generator)
            a = result.accepted
            cache = out.past_key_values
            committed_len += 1 + a
            crop_cache(cache, committed_len)
            stats.add_round(g, a)
            if cfg.record_rounds:
                conf = proposal.confidence
                records.append(
                    RoundRecord(
                        g, a, conf[:raw_g].float().cpu().tolist() if conf is not None else None, raw_g
                    )
                )
            new = [*draft[:a].tolist(), result.next_token]
            out_tokens, reason = self._finish(out_tokens + new)
            anchor = result.next_token
            if reason is None:
                self.drafter.extend(ids[0, : 1 + a], out.features[0, : 1 + a])
        self._sync()
        t2 = time.perf_counter()
        stats.decode_seconds = t2 - t1
        stats.new_tokens = len(out_tokens) - 1  # tokens produced after the prefill's first token
        return GenerationResult(out_tokens, reason, stats, t1 - t0, records)

    @torch.no_grad()
    def _generate_plain_dynamic(
        self, prompt_ids: list[int] | torch.Tensor, generator: torch.Generator | None = None
    ) -> GenerationResult:
        """Target-only decode on transformers' dynamic cache (the eager reference)."""
        cfg = self.config
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.device).reshape(-1)
        if prompt.numel() == 0:
            raise ValueError("empty prompt: at least one token is needed")
        stats = AcceptanceStats(prompts=1)
        self._sync()
        t0 = time.perf_counter()
        cache, _, logits = self._prefill(prompt)
        token = sample_token(logits, cfg.temperature, generator)
        self._sync()
        t1 = time.perf_counter()
        out_tokens, reason = self._finish([token])
        while reason is None:
            out = self.target.capture(
                torch.tensor([[token]], device=self.device), past_key_values=cache, use_cache=True
            )
            cache = out.past_key_values
            token = sample_token(
                self.target.compute_logits(out.last_hidden[0, -1:])[0], cfg.temperature, generator
            )
            stats.add_round(0, 0)
            out_tokens, reason = self._finish([*out_tokens, token])
        self._sync()
        stats.decode_seconds = time.perf_counter() - t1
        stats.new_tokens = len(out_tokens) - 1
        return GenerationResult(out_tokens, reason, stats, t1 - t0)
