"""The generation engine behind the embedded server: continuous batching on the decode core.

Requests arrive from any thread (the FastAPI event loop) through :meth:`GenerationEngine.submit`,
which returns a ``concurrent.futures.Future``. One worker thread owns the model and a
:class:`~deepspec.decode.DecodeCore` of ``max_batch_size`` cache rows (slots). Each iteration it

1. admits waiting requests into free slots (one right-padded prefill for all of them; when nothing
   is running it first waits up to ``batch_wait_ms`` to gather a wave). While rows are running it
   refills only once at least ``refill_min`` slots are free (default: an eighth of the slots):
   answers end at different lengths, and a prefill per finished row (an eager forward, many times
   the cost of a graph-replayed step on a GPU) would otherwise run almost every step;
2. runs one decode step for every running row (one token each; a CUDA graph per batch-size bucket
   on a GPU);
3. samples every row's next token on the device with the row's own parameters and generator
   (:func:`deepspec.decode.sampling.filtered_probs`), then, on the host, appends it, streams the new
   text to the request's listener, and finishes rows that hit end-of-sequence, a stop string,
   ``max_tokens`` or the cache length. A finished row frees its slot for the next refill.

Every row keeps its own temperature, top_p, top_k, min_p, seed, stop strings and max_tokens. A
row's random numbers come from its own generator and its tokens from its own cache row, so a seeded
request gives the same text whatever else is running.

Why not transformers' own continuous batching (``generate_batch`` / ``init_continuous_batching``)?
In transformers 5.23 it offers per-request temperature, top-k and top-p, but no min-p, no
per-request seed and no per-request stop strings, all of which the serving contract needs.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deepspec.decode.core import DecodeCore
from deepspec.decode.sampling import filtered_probs, inverse_cdf
from deepspec.devices import pick_device
from deepspec.serve.sampling import SamplingParams
from deepspec.serve.spec_stats import SpecStats
from deepspec.target_model.model import TargetModel

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_CACHE_LEN = 4096  # tokens per slot (prompt + answer) unless --max-model-len says otherwise
MIN_CACHE_LEN = 512

TextListener = Callable[[str], None]


@dataclass
class Completion:
    """One finished generation."""

    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    spec: SpecStats | None = None  # speculative counts (speculative serving only)


def finish_completion(
    tokenizer: Any,
    eos_ids: list[int],
    tokens: list[int],
    p: SamplingParams,
    prompt_len: int,
    stopped_at: int | None = None,
) -> Completion:
    """The completion of generated ``tokens``: cut at ``max_tokens``, end-of-sequence and stop strings."""
    tokens = tokens[: p.max_tokens]
    if stopped_at is not None:
        tokens = tokens[:stopped_at]
    eos_at = next((k for k, t in enumerate(tokens) if t in eos_ids), None)
    if eos_at is not None:
        tokens = tokens[: eos_at + 1]
    content = tokens[:eos_at] if eos_at is not None else tokens
    text = tokenizer.decode(content, skip_special_tokens=True)
    cut = [text.find(s) for s in p.stop if s in text]
    if cut:
        text, reason = text[: min(cut)], "stop"
    elif eos_at is not None or stopped_at is not None:
        reason = "stop"
    else:
        reason = "length"  # max_tokens (or the context) reached
    return Completion(text, reason, prompt_len, len(tokens), tokens)


@dataclass
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    on_text: TextListener | None = None  # streaming: called with each new piece of text
    future: Future = field(default_factory=Future)


@dataclass
class _Row:
    """A running request in its cache slot."""

    job: _Job
    slot: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    length: int = 0  # positions written in the cache (the last sampled token is not yet)
    stopped_at: int | None = None
    sent: str = ""  # text already streamed


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' = bfloat16 on GPU, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def batch_bucket(rows: int, limit: int) -> int:
    """Step batch size for slots ``0..rows-1``: the next power of two, at most ``limit``."""
    size = 1
    while size < rows:
        size *= 2
    return min(size, limit)


class QueueWorker:
    """A worker thread fed by a queue of jobs (each with a ``future``); ``None`` is the stop sentinel."""

    thread_name = "deepspec-worker"
    _queue: queue.Queue[Any]
    _thread: threading.Thread | None

    def _worker(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._worker, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 60.0) -> None:
        """Finish the requests being decoded, fail what is still queued, and end the worker."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and not job.future.done():
                job.future.set_exception(RuntimeError("server is shutting down"))

    @property
    def queued(self) -> int:
        return self._queue.qsize()


class GenerationEngine(QueueWorker):
    """A causal LM + tokenizer and the worker thread that serves requests by continuous batching."""

    thread_name = "deepspec-generate"

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 32,
        batch_wait_ms: float = 20.0,
        trust_remote_code: bool = False,
        max_model_len: int | None = None,
        cuda_graphs: bool | None = None,
        refill_min: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if refill_min is not None and not 1 <= refill_min <= max_batch_size:
            raise ValueError(f"refill_min must be between 1 and max_batch_size ({max_batch_size})")
        self.model_path = model_path
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        # free slots that trigger a refill while rows are running (one prefill for several requests)
        self.refill_min = refill_min or max(1, max_batch_size // 8)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=self.dtype, trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids: list[int] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.model.generation_config.pad_token_id
        self.pad_id: int = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        model_context: int | None = getattr(self.model.config, "max_position_embeddings", None)
        cache_len = max_model_len or min(model_context or DEFAULT_CACHE_LEN, DEFAULT_CACHE_LEN)
        if model_context is not None and cache_len > model_context:
            raise ValueError(f"max_model_len {cache_len} exceeds the model's context of {model_context}")
        self.max_context: int = cache_len  # prompt + answer of one request (one cache slot)
        target = TargetModel.from_model(self.model, [0])
        # the cache starts small and grows (powers of two) with the running requests' needs
        self.core = DecodeCore(
            target, 1, min(MIN_CACHE_LEN, cache_len), features=False, cuda_graphs=cuda_graphs
        )
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one decoding loop at a time (worker or a direct generate call)
        self.active_rows = 0
        self.stats: dict[str, Any] = {
            "batches": 0,  # admission waves (prefills)
            "requests": 0,
            "max_batch": 0,  # most rows decoding together
            "generated_tokens": 0,
            "steps": 0,
            "step_seconds": 0.0,
        }

    # ---------------------------------------------------------------------------------------------
    # lifecycle
    # ---------------------------------------------------------------------------------------------

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, on_text: TextListener | None = None
    ) -> Future:
        """Queue one request; the future resolves to a :class:`Completion`.

        ``on_text`` (streaming) is called from the worker thread with each new piece of the answer's
        text as tokens are produced; the pieces are a prefix of the final text (text that could still
        turn out to start a stop string is held back until it cannot).
        """
        job = _Job(prompt_ids, params, on_text)
        self._queue.put(job)
        return job.future

    def room_for(self, prompt_len: int) -> int | None:
        """New tokens that still fit in one cache slot after this prompt."""
        return self.max_context - prompt_len

    # ---------------------------------------------------------------------------------------------
    # the decoding loop
    # ---------------------------------------------------------------------------------------------

    def _worker(self) -> None:
        with self._lock:
            self._loop(self._take, until_idle=False)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        """Generate for tokenised prompts, each with its own parameters (synchronous; tests, benches).

        Runs the same continuous-batching loop as the server, in the calling thread: at most
        ``max_batch_size`` rows at once, freed slots refilled from the next prompts (``refill_min``).
        """
        jobs = [_Job(p, s) for p, s in zip(prompts, params, strict=True)]
        pending = list(jobs)

        def take(block: bool, free: int) -> list[_Job] | None:
            taken = pending[:free]
            del pending[:free]
            return taken

        with self._lock:
            self._loop(take, until_idle=True)
        return [j.future.result() for j in jobs]

    def _take(self, block: bool, free: int) -> list[_Job] | None:
        """Jobs for ``free`` slots from the queue; None when the stop sentinel arrives."""
        jobs: list[_Job] = []
        if free <= 0:
            return jobs
        if block:
            first = self._queue.get()
            if first is None:
                return None
            jobs.append(first)
            deadline = time.monotonic() + self.batch_wait_s
        else:
            deadline = time.monotonic()
        while len(jobs) < free:
            try:
                left = deadline - time.monotonic()
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stop: admit nothing more, finish the running rows
                self._queue.put(None)
                return jobs or None
            jobs.append(job)
        return jobs

    def _loop(self, take: Callable[[bool, int], list[_Job] | None], until_idle: bool) -> None:
        rows: dict[int, _Row] = {}
        stopping = False
        while True:
            free = self.max_batch_size - len(rows)
            if not stopping and (not rows or free >= self.refill_min):
                jobs = take(not rows and not until_idle, free)
                if jobs is None:
                    stopping = True
                elif jobs:
                    self._admit(jobs, rows)
            if not rows:
                if stopping or until_idle:
                    return
                continue
            try:
                self._step(rows)
            except Exception as e:  # one failed step must not kill the server: fail its requests
                log.exception("decode step failed for %d requests", len(rows))
                for row in rows.values():
                    if not row.job.future.done():
                        row.job.future.set_exception(e)
                rows.clear()
            self.active_rows = len(rows)

    @torch.inference_mode()
    def _admit(self, jobs: list[_Job], rows: dict[int, _Row]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        bad = [j for j in live if not j.prompt_ids or len(j.prompt_ids) >= self.max_context]
        for j in bad:
            j.future.set_exception(
                ValueError(
                    f"prompt of {len(j.prompt_ids)} tokens does not fit the {self.max_context}-token context"
                )
            )
        live = [j for j in live if j not in bad]
        if not live:
            return
        free = [s for s in range(self.max_batch_size) if s not in rows][: len(live)]
        longest = max(len(j.prompt_ids) + j.params.max_tokens + 1 for j in live)
        self.core.resize(
            batch_bucket(max(free[: len(live)]) + 1, self.max_batch_size),
            min(self.max_context, batch_bucket(longest, 1 << 30)),
        )
        new = []
        for job, slot in zip(live, free, strict=False):
            gen = None
            if not job.params.greedy:
                seed = job.params.seed if job.params.seed is not None else secrets.randbits(63)
                gen = torch.Generator().manual_seed(seed)
            new.append(_Row(job, slot, gen, length=len(job.prompt_ids)))
        try:
            logits, _ = self.core.prefill(
                [r.slot for r in new], [torch.tensor(r.job.prompt_ids, dtype=torch.long) for r in new]
            )
            tokens = self._sample(logits, new).tolist()
        except Exception as e:
            log.exception("prefill failed for %d requests", len(new))
            for r in new:
                r.job.future.set_exception(e)
            return
        self.stats["batches"] += 1
        self.stats["requests"] += len(new)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(rows) + len(new))
        for r, t in zip(new, tokens, strict=True):
            rows[r.slot] = r
            self._append(r, t, rows)

    @torch.inference_mode()
    def _step(self, rows: dict[int, _Row]) -> None:
        t0 = time.perf_counter()
        b = batch_bucket(max(rows) + 1, self.max_batch_size)
        ids = [0] * b
        pos = [0] * b
        for slot, r in rows.items():
            ids[slot] = r.tokens[-1]
            pos[slot] = r.length
        out = self.core.step(
            torch.tensor(ids, device=self.device)[:, None],
            torch.tensor(pos, device=self.device)[:, None],
            needed=max(pos) + 1,
        )
        live = list(rows.values())
        index = torch.tensor([r.slot for r in live], device=self.device)
        tokens = self._sample(out.logits[:, 0].index_select(0, index), live).tolist()
        for r, t in zip(live, tokens, strict=True):
            r.length += 1
            self._append(r, t, rows)
        self.stats["steps"] += 1
        self.stats["step_seconds"] += time.perf_counter() - t0
        self.stats["max_batch"] = max(self.stats["max_batch"], len(live))

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Next token of each row from its logits [n, V]: argmax for greedy rows, else a filtered draw."""
        greedy = logits.argmax(dim=-1)
        sampling = [i for i, r in enumerate(rows) if r.generator is not None]
        if not sampling:
            return greedy
        ps = [rows[i].job.params for i in sampling]
        dev = logits.device
        sel = torch.tensor(sampling, device=dev)
        probs = filtered_probs(
            logits.index_select(0, sel),
            torch.tensor([p.temperature for p in ps], device=dev),
            torch.tensor([p.top_k for p in ps], device=dev),
            torch.tensor([p.top_p for p in ps], device=dev),
            torch.tensor([p.min_p for p in ps], device=dev),
            (any(p.top_k > 0 for p in ps), any(p.top_p < 1.0 for p in ps), any(p.min_p > 0 for p in ps)),
        )
        u = torch.cat([torch.rand(1, generator=rows[i].generator) for i in sampling]).to(dev)
        return greedy.index_copy(0, sel, inverse_cdf(probs, u))

    def _append(self, r: _Row, token: int, rows: dict[int, _Row]) -> None:
        """Add a sampled token; stream new text; finish the row when it is done."""
        p = r.job.params
        r.tokens.append(token)
        done = token in self.eos_ids or len(r.tokens) >= p.max_tokens or r.length + 1 >= self.max_context
        if p.stop and not done:
            window = max(len(s) for s in p.stop) + 4  # a stop string of L characters spans <= L tokens
            tail = self.tokenizer.decode(r.tokens[-window:], skip_special_tokens=True)
            if any(s in tail for s in p.stop):
                r.stopped_at = len(r.tokens)
                done = True
        if r.job.on_text is not None and not done:
            self._stream(r)
        if done:
            del rows[r.slot]
            completion = self._finish(r.tokens, p, len(r.job.prompt_ids), r.stopped_at)
            self.stats["generated_tokens"] += completion.completion_tokens
            r.job.future.set_result(completion)

    def _stream(self, r: _Row) -> None:
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        hold = max((len(s) for s in r.job.params.stop), default=1) - 1  # could still start a stop string
        safe = text[: len(text) - hold].rstrip("\ufffd")  # and no half of a multi-byte character
        if len(safe) > len(r.sent) and safe.startswith(r.sent):
            delta, r.sent = safe[len(r.sent) :], safe
            r.job.on_text(delta)

    def _finish(
        self, tokens: list[int], p: SamplingParams, prompt_len: int, stopped_at: int | None
    ) -> Completion:
        return finish_completion(self.tokenizer, self.eos_ids, tokens, p, prompt_len, stopped_at)

    def check_params(self, params: SamplingParams) -> None:
        """Every sampling parameter is supported (the speculative engine refuses some)."""
