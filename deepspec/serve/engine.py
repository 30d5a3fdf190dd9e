"""The generation engine behind the embedded server: one worker thread batching requests for ``generate``.

Requests arrive from any thread (the FastAPI event loop) through :meth:`GenerationEngine.submit`,
which returns a ``concurrent.futures.Future``. One worker thread takes the first waiting request,
gathers whatever else is waiting (up to ``max_batch_size``, within ``batch_wait_ms``), left-pads the
prompts into one batch and runs ``model.generate`` once. Every row keeps its own sampling parameters,
seed, ``max_tokens`` and stop strings (see :mod:`deepspec.serve.sampling`), so any requests can share
a batch. A batch runs until its longest row finishes; new requests wait for the next batch.

Why not transformers' own continuous batching (``generate_batch`` / ``init_continuous_batching``)?
In transformers 5.23 it offers per-request temperature, top-k and top-p, but no min-p, no
per-request seed and no per-request stop strings, all of which the serving contract needs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from deepspec.devices import pick_device
from deepspec.serve.sampling import PerRowSampler, PerRowStopping, SamplingParams

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Completion:
    """One finished generation."""

    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)


@dataclass
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    future: Future = field(default_factory=Future)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' = bfloat16 on GPU, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class GenerationEngine:
    """A causal LM + tokenizer and the worker thread that serves batched generation requests."""

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 32,
        batch_wait_ms: float = 20.0,
        trust_remote_code: bool = False,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.model_path = model_path
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
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
        self.max_context: int | None = getattr(self.model.config, "max_position_embeddings", None)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.stats: dict[str, Any] = {"batches": 0, "requests": 0, "max_batch": 0, "generated_tokens": 0}

    # ---------------------------------------------------------------------------------------------
    # lifecycle
    # ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._worker, name="deepspec-generate", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 60.0) -> None:
        """Finish the running batch, fail what is still queued, and end the worker."""
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

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Future:
        """Queue one request; the future resolves to a :class:`Completion`."""
        job = _Job(prompt_ids, params)
        self._queue.put(job)
        return job.future

    def room_for(self, prompt_len: int) -> int | None:
        """New tokens that still fit in the model context after this prompt (None = unknown)."""
        return None if self.max_context is None else self.max_context - prompt_len

    # ---------------------------------------------------------------------------------------------
    # worker
    # ---------------------------------------------------------------------------------------------

    def _take_batch(self) -> list[_Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # stop after this batch
                self._queue.put(None)
                break
            batch.append(job)
        return batch

    def _worker(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = self.generate([j.prompt_ids for j in live], [j.params for j in live])
            except Exception as e:  # one bad batch must not kill the server
                log.exception("generation failed for a batch of %d", len(live))
                for j in live:
                    j.future.set_exception(e)
                continue
            for j, r in zip(live, results, strict=True):
                j.future.set_result(r)

    # ---------------------------------------------------------------------------------------------
    # one batch
    # ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        """Generate for a batch of tokenised prompts, each with its own parameters (synchronous)."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention[i, width - len(p) :] = 1
        stopping = PerRowStopping(params, width, self.tokenizer)
        config = GenerationConfig(
            do_sample=False,  # PerRowSampler has already drawn each sampling row's token
            num_beams=1,
            max_new_tokens=max(p.max_tokens for p in params),
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.pad_id,
        )
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            generation_config=config,
            logits_processor=LogitsProcessorList([PerRowSampler(params, self.device)]),
            stopping_criteria=StoppingCriteriaList([stopping]),
        )
        new = out[:, width:].tolist()
        results = [
            self._finish(row, p, len(prompt), stopping.stopped_at.get(i))
            for i, (row, p, prompt) in enumerate(zip(new, params, prompts, strict=True))
        ]
        self.stats["batches"] += 1
        self.stats["requests"] += len(prompts)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(prompts))
        self.stats["generated_tokens"] += sum(r.completion_tokens for r in results)
        return results

    def _finish(
        self, tokens: list[int], p: SamplingParams, prompt_len: int, stopped_at: int | None
    ) -> Completion:
        tokens = tokens[: p.max_tokens]
        if stopped_at is not None:
            tokens = tokens[:stopped_at]
        eos_at = next((k for k, t in enumerate(tokens) if t in self.eos_ids), None)
        if eos_at is not None:
            tokens = tokens[: eos_at + 1]
        content = tokens[:eos_at] if eos_at is not None else tokens
        text = self.tokenizer.decode(content, skip_special_tokens=True)
        cut = [text.find(s) for s in p.stop if s in text]
        if cut:
            text, reason = text[: min(cut)], "stop"
        elif eos_at is not None or stopped_at is not None:
            reason = "stop"
        else:
            reason = "length"  # max_tokens (or the model context) reached
        return Completion(text, reason, prompt_len, len(tokens), tokens)
