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
  CUDA graphs for the fixed-size steps on a GPU. :meth:`SpeculativeEngine.generate_batch` runs ``B``
  prompts in lockstep (per-row acceptance); a row's tokens do not depend on the rows beside it, so
  ``generate`` is ``generate_batch`` of one prompt. Eagle3 drafts every row in one forward per step
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
    ) -> list[GenerationResult]:
        """Speculative decode of ``B`` prompts in lockstep (static cache; one drafter per row).

        Drafters: ``drafters`` if given, else the engine's drafter for row 0 and
        ``drafter_factory()`` for the others. Every row verifies ``num_proposals`` slots per round
        (shorter proposals are padded and masked), so one step shape serves the whole run.
        """
        if self.drafter is None and drafters is None:
            raise ValueError(
                "SpeculativeEngine.generate needs a drafter; use generate_plain for the target alone"
            )
        if drafters is None and self._batched_drafter_usable():
            return self._lockstep(prompts, generators, None, batched=True)
        if drafters is None:
            if len(prompts) > 1 and self.drafter_factory is None:
                raise ValueError(
                    f"batched decoding of {len(prompts)} prompts needs one drafter per row: "
                    "pass drafters=[...] or build the engine with drafter_factory"
                )
            drafters = [self.drafter, *(self.drafter_factory() for _ in range(len(prompts) - 1))]
        if len(drafters) != len(prompts):
            raise ValueError(f"{len(drafters)} drafters for {len(prompts)} prompts")
        return self._lockstep(prompts, generators, list(drafters))

    @torch.no_grad()
    def generate_plain_batch(
        self,
        prompts: Sequence[list[int] | torch.Tensor],
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> list[GenerationResult]:
        """Target-only decode of ``B`` prompts in lockstep on the same core (the batched baseline)."""
        return self._lockstep(prompts, generators, None)

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
    ) -> list[GenerationResult]:
        """Prefill every row, then rounds of (propose per row, one batched verify step) until all rows end.

        ``batched``: the engine's drafter proposes for all rows in one forward per step
        (:meth:`_batched_drafter`) instead of ``drafters``. Plain decoding is the same loop with no
        draft slots. One host transfer per round carries
        every row's accepted count and next token back; rows that ended keep their slot (their
        step results are ignored) until the last row ends.
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
        drafting = drafters is not None or batched
        slots = cfg.num_proposals if drafting else 0
        sampling = cfg.temperature > 0
        lengths = [int(p.numel()) for p in prompts]
        core = self._core(n, max(lengths) + cfg.max_new_tokens + slots + 2)
        bdraft = self._batched_drafter(core) if batched else None
        stats = [AcceptanceStats(prompts=1) for _ in range(n)]
        records: list[list[RoundRecord]] = [[] for _ in range(n)]

        self._sync()
        t0 = time.perf_counter()
        if drafters is not None:
            for d in drafters:
                d.reset()
        if bdraft is not None:
            bdraft.reset()
        logits, features = core.prefill(list(range(n)), prompts)
        u = row_uniforms(generators, 1, self.device)[:, 0] if sampling else None
        anchors = sample_rows(logits, cfg.temperature, u).tolist()
        if drafters is not None:
            for d, p, f in zip(drafters, prompts, features, strict=True):
                d.extend(p.to(self.device), f)
        if bdraft is not None:
            for b, (p, f) in enumerate(zip(prompts, features, strict=True)):
                bdraft.prefill(b, p.to(self.device), f)
        self._sync()
        t1 = time.perf_counter()

        outs: list[list[int]] = [[] for _ in range(n)]
        reasons = [self._append(outs[b], [anchors[b]]) for b in range(n)]
        if not drafting:
            self._plain_steps(core, outs, reasons, lengths, stats, generators)
        anchors_dev = torch.tensor(anchors, device=self.device)
        offsets = torch.arange(slots + 1, device=self.device)
        vocab = self.target.vocab_size
        while any(r is None for r in reasons):
            active = [b for b in range(n) if reasons[b] is None]
            drafts = [[] for _ in range(n)]
            kept = [0] * n
            per_row_probs = sampling and slots and bdraft is None
            probs = torch.zeros(n, slots, vocab, device=self.device) if per_row_probs else None
            if bdraft is not None:  # every row in one forward per step; tokens stay on the device
                u_draft = self._active_uniforms(generators, active, n, slots) if sampling else None
                needed = max(lengths) - 1 + slots  # committed pairs + proposals of the longest row
                proposal = bdraft.propose(anchors_dev, slots, cfg.temperature, u_draft, needed)
                probs = proposal.probs
                kept = [slots] * n
                ids = torch.cat(
                    [anchors_dev[:, None], proposal.tokens], dim=1
                )  # a copy: graph outputs are reused
                for b in active if cfg.record_rounds else ():
                    records[b].append(RoundRecord(slots, 0, None, slots))
            for b in active if drafters is not None else ():
                proposal = drafters[b].propose(anchors[b], slots, cfg.temperature, generators[b])
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
                ids_host = [[anchors[b], *drafts[b], *[0] * (slots - kept[b])] for b in range(n)]
                ids = torch.tensor(ids_host, device=self.device)
            start = torch.tensor(lengths, device=self.device)
            out = core.step(ids, start[:, None] + offsets, max(lengths) + slots + 1)
            # rows that ended draw nothing (their streams stay put)
            u = self._active_uniforms(generators, active, n, slots + 1) if sampling else None
            accepted, nxt = verify_rows(
                ids[:, 1:], torch.tensor(kept, device=self.device), probs, out.logits, cfg.temperature, u
            )
            if bdraft is not None:
                # commit anchor + accepted drafts of the active rows, on the device, before the host read
                live = torch.zeros(n, dtype=torch.long, device=self.device)
                live[torch.tensor(active, device=self.device)] = 1
                bdraft.extend(ids, out.features, (1 + accepted) * live)
                anchors_dev = nxt
                host = torch.cat([accepted[:, None], nxt[:, None], ids], dim=1).tolist()
                acc_host, next_host = [r[0] for r in host], [r[1] for r in host]
                ids_host = [r[2:] for r in host]
                drafts = [r[1:] for r in ids_host]
            else:
                acc_host, next_host = torch.stack([accepted, nxt]).tolist()
            for b in active:
                a = acc_host[b]
                stats[b].add_round(kept[b], a)
                if cfg.record_rounds and drafting:
                    records[b][-1].accepted = a
                lengths[b] += 1 + a
                reasons[b] = self._append(outs[b], [*drafts[b][:a], next_host[b]])
                anchors[b] = next_host[b]
                if reasons[b] is None and drafters is not None:
                    # host tokens (no device read); a copy of the features, since a replayed graph
                    # overwrites its output buffers at the next step
                    committed = torch.tensor([ids_host[b][0], *drafts[b][:a]])
                    drafters[b].extend(committed, out.features[b, : 1 + a].clone())
        self._sync()
        wall = time.perf_counter() - t1
        total_new = sum(len(o) - 1 for o in outs)
        results = []
        for b in range(n):
            st = stats[b]
            st.new_tokens = len(outs[b]) - 1  # tokens produced after the prefill's first token
            # the batch's decode time, shared in proportion to the tokens each row produced, so that
            # summed over rows tokens / seconds is the batch's throughput
            st.decode_seconds = wall * (st.new_tokens / total_new if total_new else 1.0 / n)
            results.append(GenerationResult(outs[b], reasons[b] or "length", st, t1 - t0, records[b]))
        return results

    def _plain_steps(
        self,
        core: DecodeCore,
        outs: list[list[int]],
        reasons: list[str | None],
        lengths: list[int],
        stats: list[AcceptanceStats],
        generators: list[torch.Generator | None],
    ) -> None:
        """Plain decoding without a host round trip per token.

        Each step's input is the previous step's sampled token, still on the device, so steps are
        queued back to back and the host reads the tokens once per ``PLAIN_CHUNK`` steps to apply
        stop tokens and ``max_new_tokens``. Tokens a row produced after its end are discarded. Its
        draws come from a private generator seeded by one draw from the row's generator, so the
        caller's generator advances by the same amount whatever the chunking and the batch (a later
        turn of the same prompt then starts from the same state).
        """
        cfg = self.config
        n = len(outs)
        if cfg.temperature > 0:
            generators = [_private_generator(g, self.device) for g in generators]
        token = torch.tensor([o[-1] for o in outs], device=self.device)
        position = torch.tensor(lengths, device=self.device)
        longest = max(lengths)
        while any(r is None for r in reasons):
            left = max(cfg.max_new_tokens - len(outs[b]) for b in range(n) if reasons[b] is None)
            produced = []
            for _ in range(min(PLAIN_CHUNK, left)):
                longest += 1
                out = core.step(token[:, None], position[:, None], longest)
                u = row_uniforms(generators, 1, self.device)[:, 0] if cfg.temperature > 0 else None
                token = sample_rows(out.logits[:, 0], cfg.temperature, u)
                position = position + 1
                produced.append(token)
            for b, row in enumerate(torch.stack(produced, dim=1).tolist()):
                for t in row:
                    if reasons[b] is not None:
                        break
                    stats[b].add_round(0, 0)
                    reasons[b] = self._append(outs[b], [t])

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
