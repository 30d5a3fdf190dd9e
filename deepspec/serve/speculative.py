"""Speculative serving (``deepspec serve --draft``): requests decoded by a speculative batch decoder.

The decoder is injected (a :data:`BatchDecoder`): :mod:`deepspec.eval.serving` builds it on the
evaluation engine (``SpeculativeEngine.generate_batch``: exact rejection sampling, greedy at
temperature 0, so the answers are the target's own), because the serving layer sits below the
evaluation stage and may not import it.

Scheduling is simple and correct rather than fast: one worker thread serves **one batch at a
time**. It waits for a first request, gathers what else arrives within ``batch_wait_ms`` (at most
``max_batch_size``), groups the requests by ``(temperature, max_tokens)`` (the engine decodes a batch
with one temperature and one length limit), and decodes each group in lockstep with
``generate_batch`` (per-row acceptance, one drafter per row, a row's tokens independent of the
rows beside it). Requests that arrive meanwhile wait for the next batch. ``stream=true`` answers
arrive as one piece when the request is finished.

Sampling: temperature, seed, ``max_tokens`` and stop strings (applied to the finished answer).
``top_p``, ``top_k`` and ``min_p`` change the target distribution that speculative verification
must reproduce and are refused with a 400 (the plain server supports them).

``/metrics`` (:class:`SpeculativeCollector`) exports the engines' own names and semantics next to
the ``deepspec_*`` families, so ``deepspec monitor`` reads this server as it reads SGLang or vLLM
(rules and sources in :mod:`deepspec.monitor.scrape`):

* vLLM (``SpecDecodingProm``, ``vllm/v1/spec_decode/metrics.py``): counters
  ``vllm:spec_decode_num_drafts``, ``..._num_draft_tokens``, ``..._num_accepted_tokens`` and
  ``..._num_accepted_tokens_per_pos{position}``, labelled ``model_name`` and ``engine``;
* SGLang (``SchedulerMetricsCollector``, ``python/sglang/srt/metrics/collector.py``): gauges
  ``sglang:spec_accept_length`` / ``sglang:spec_accept_rate`` with upstream's *interval* meaning
  (the last decoded batch; kept while idle), labelled ``model_name``, ``engine_type``,
  ``tp_rank``, ``pp_rank``; counters ``sglang:generation_tokens`` (completion tokens) and
  ``sglang:spec_verify_calls`` (verification steps), SGLang's per-request definition of the
  accepted length being ``completion_tokens / spec_verify_ct``.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from deepspec.serve.engine import QueueWorker, TextListener, finish_completion
from deepspec.serve.protocol import BadRequest
from deepspec.serve.sampling import SamplingParams
from deepspec.serve.spec_stats import SpecStats

log = logging.getLogger(__name__)


@dataclass
class Decoded:
    """One row decoded by the speculative decoder: new tokens (a stop token included) and counts."""

    tokens: list[int]
    stats: SpecStats


# (prompts, temperature, max_new_tokens, one generator per row or None) -> one Decoded per prompt
BatchDecoder = Callable[[list[list[int]], float, int, list[torch.Generator | None]], list[Decoded]]


@dataclass
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    on_text: TextListener | None = None
    future: Future = field(default_factory=Future)


class SpeculativeGenerationEngine(QueueWorker):
    """The :class:`~deepspec.serve.engine.GenerationEngine` interface over a speculative batch decoder."""

    thread_name = "deepspec-speculative"

    def __init__(
        self,
        decoder: BatchDecoder,
        tokenizer: Any,
        *,
        model_path: str,
        max_context: int,
        eos_ids: list[int],
        num_proposals: int,
        max_batch_size: int = 8,
        batch_wait_ms: float = 20.0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.max_context = max_context
        self.eos_ids = eos_ids
        self.num_proposals = num_proposals
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # counters read by /metrics while the worker updates them
        self.active_rows = 0
        self.stats: dict[str, Any] = {
            "batches": 0,
            "requests": 0,
            "max_batch": 0,
            "generated_tokens": 0,
            "steps": 0,  # verification steps (target forwards after the prefill)
            "step_seconds": 0.0,
        }
        self.spec_total = SpecStats(histogram=[0] * (num_proposals + 1))
        self.spec_last_batch: SpecStats | None = None  # SGLang's interval gauge

    # ------------------------------------------------------------------------------------ lifecycle

    def check_params(self, params: SamplingParams) -> None:
        """Refuse what speculative verification does not reproduce (a 400 naming the field)."""
        for name, value, off in (
            ("top_p", params.top_p, 1.0),
            ("top_k", params.top_k, 0),
            ("min_p", params.min_p, 0.0),
        ):
            if value != off:
                raise BadRequest(
                    f"'{name}' is not supported with speculative decoding (deepspec serve --draft "
                    "samples from the target at the request's temperature); leave it unset, or serve "
                    "without --draft",
                    name,
                )

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, on_text: TextListener | None = None
    ) -> Future:
        """Queue one request; the future resolves to a :class:`~deepspec.serve.engine.Completion`."""
        self.check_params(params)
        job = _Job(prompt_ids, params, on_text)
        self._queue.put(job)
        return job.future

    def room_for(self, prompt_len: int) -> int | None:
        # the last round may verify num_proposals slots past the answer's end
        return self.max_context - prompt_len - self.num_proposals - 1

    # ------------------------------------------------------------------------------------ decoding

    def _gather(self) -> list[_Job] | None:
        """The next batch: a first request (blocking), then what arrives within ``batch_wait_ms``."""
        first = self._queue.get()
        if first is None:
            return None
        jobs = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(jobs) < self.max_batch_size:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this batch
                break
            jobs.append(job)
        return jobs

    def _worker(self) -> None:
        while (jobs := self._gather()) is not None:
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            groups: dict[tuple[float, int], list[_Job]] = {}
            for j in live:
                groups.setdefault((j.params.temperature, j.params.max_tokens), []).append(j)
            for (temperature, max_tokens), group in groups.items():
                try:
                    self._decode(group, temperature, max_tokens)
                except Exception as e:  # one failed batch must not kill the server
                    log.exception("speculative decoding failed for %d requests", len(group))
                    for j in group:
                        if not j.future.done():
                            j.future.set_exception(e)

    def _decode(self, jobs: list[_Job], temperature: float, max_tokens: int) -> None:
        generators: list[torch.Generator | None] = []
        for j in jobs:
            if temperature > 0:
                seed = j.params.seed if j.params.seed is not None else secrets.randbits(63)
                generators.append(torch.Generator().manual_seed(seed))
            else:
                generators.append(None)
        self.active_rows = len(jobs)
        t0 = time.perf_counter()
        try:
            rows = self.decoder([j.prompt_ids for j in jobs], temperature, max_tokens, generators)
        finally:
            self.active_rows = 0
        seconds = time.perf_counter() - t0
        batch = SpecStats()
        done = []
        for j, row in zip(jobs, rows, strict=True):
            completion = finish_completion(
                self.tokenizer, self.eos_ids, row.tokens, j.params, len(j.prompt_ids)
            )
            completion.spec = row.stats
            batch = batch + row.stats
            done.append((j, completion))
        with self._lock:
            self.stats["batches"] += 1
            self.stats["requests"] += len(jobs)
            self.stats["max_batch"] = max(self.stats["max_batch"], len(jobs))
            self.stats["generated_tokens"] += sum(c.completion_tokens for _, c in done)
            self.stats["steps"] += batch.verify_steps
            self.stats["step_seconds"] += seconds
            self.spec_total = self.spec_total + batch
            if batch.verify_steps:
                self.spec_last_batch = batch
        for j, completion in done:
            if j.on_text is not None and completion.text:
                j.on_text(completion.text)
            j.future.set_result(completion)

    def snapshot(self) -> tuple[SpecStats, SpecStats | None, int]:
        """(lifetime counts, the last batch's counts, completion tokens) read together."""
        with self._lock:
            return self.spec_total, self.spec_last_batch, int(self.stats["generated_tokens"])


class SpeculativeCollector:
    """SGLang's and vLLM's speculative metric families, built at scrape time from the engine's counts."""

    def __init__(self, engine: SpeculativeGenerationEngine, served_model_name: str) -> None:
        self.engine = engine
        self.model = served_model_name

    def collect(self) -> Iterator[Metric]:
        total, last, tokens = self.engine.snapshot()
        vllm = ["model_name", "engine"]
        for name, doc, value in (
            ("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", total.verify_steps),
            ("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", total.proposed),
            ("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.", total.accepted),
        ):
            fam = CounterMetricFamily(name, doc, labels=vllm)
            fam.add_metric([self.model, "0"], value)
            yield fam
        per_pos = CounterMetricFamily(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Accepted tokens per draft position.",
            labels=[*vllm, "position"],
        )
        for pos, value in enumerate(total.accepted_at()):
            per_pos.add_metric([self.model, "0", str(pos)], value)
        yield per_pos

        sched = ["model_name", "engine_type", "tp_rank", "pp_rank"]
        labels = [self.model, "unified", "0", "0"]
        length = GaugeMetricFamily("sglang:spec_accept_length", "The average acceptance length", labels=sched)
        rate = GaugeMetricFamily("sglang:spec_accept_rate", "The average acceptance rate", labels=sched)
        length.add_metric(labels, last.accept_length if last else 0.0)
        rate.add_metric(labels, last.acceptance_rate if last else 0.0)
        yield length
        yield rate
        gen = CounterMetricFamily(
            "sglang:generation_tokens", "Number of generation tokens", labels=["model_name"]
        )
        gen.add_metric([self.model], tokens)
        yield gen
        verify = CounterMetricFamily(
            "sglang:spec_verify_calls", "Number of speculative verification calls", labels=["model_name"]
        )
        verify.add_metric([self.model], total.verify_steps)
        yield verify
