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
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from deepspec.eval.metrics import AcceptanceStats
from deepspec.eval.sampling import sample_token, verify

if TYPE_CHECKING:
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


class SpeculativeEngine:
    """Drives a frozen target and a :class:`SpeculativeDrafter` (Eagle3, DFlash, DSpark, n-gram...)."""

    def __init__(
        self,
        target: TargetModel,
        drafter: SpeculativeDrafter | None,
        config: EngineConfig | None = None,
        scheduler: PrefixScheduler | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        self.target = target
        self.drafter = drafter
        self.config = config or EngineConfig()
        self.scheduler = scheduler
        self.calibration = calibration
        self.device = target.lm_head.weight.device

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
    def generate_plain(
        self, prompt_ids: list[int] | torch.Tensor, generator: torch.Generator | None = None
    ) -> GenerationResult:
        """Target-only decode, one token per forward, same prefill and KV-cache path (the baseline)."""
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
