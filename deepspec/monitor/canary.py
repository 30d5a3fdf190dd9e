"""Canary mode: a fixed, seeded prompt set sent through the OpenAI-compatible API.

Each run sends the same prompts (greedy, fixed ``max_tokens``) with the official ``openai`` client
and reads the per-request speculative statistics the server returns:

* SGLang, OpenAI API: ``sglext.spec_tokens_details`` when the request carries
  ``return_spec_tokens_details: true`` (sgl-project/sglang PR #33518, "feat(api): add sglext_spec";
  built by ``spec_tokens_details_from_meta_info`` in ``python/sglang/srt/entrypoints/openai/utils.py``)
  with ``spec_verify_ct``, ``spec_num_correct_drafts``, ``spec_num_proposed_drafts``,
  ``spec_accept_length`` and ``spec_correct_drafts_histogram``.
* SGLang native ``meta_info`` (``TokenizerManager._calculate_spec_decoding_metrics`` in
  ``python/sglang/srt/managers/tokenizer_manager.py``): the same ``spec_verify_ct`` with the older
  names ``spec_accepted_drafts`` / ``spec_proposed_drafts`` or ``spec_accept_token_num`` /
  ``spec_draft_token_num``; the oldest builds only have ``spec_verify_ct``, where the accepted
  length is ``completion_tokens / spec_verify_ct`` (sgl-project/sglang PR #3152).
* vLLM: ``metrics.speculative_decoding`` when the server runs with
  ``--per-request-spec-decode-metrics summary`` (``ObservabilityConfig.per_request_spec_decode_metrics``
  in ``vllm/config/observability.py``): ``num_spec_steps``, ``num_accepted_draft_tokens``,
  ``num_draft_tokens``, ``acceptance_histogram`` and ``mean_acceptance_length``.

An acceptance histogram counts verification steps by number of accepted draft tokens; the steps
that accepted the token at position ``i`` are ``sum(histogram[i + 1:])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepspec.monitor.scrape import Engine, Measurement
from deepspec.monitor.window import AcceptanceSample


class CanaryError(ValueError):
    """The canary prompt set cannot be built; the message says what to do."""


def load_canary_prompts(path: str | Path, num_prompts: int, seed: int) -> list[str]:
    """The first user turn of ``num_prompts`` records of a ``{"turns": [...]}`` JSONL file, shuffled
    with ``seed`` the way ``deepspec eval`` selects benchmark prompts (same file + seed -> same set)."""
    from deepspec.eval.benchmarks import read_benchmark_file, select_prompts

    p = Path(path)
    if not p.is_file():
        raise CanaryError(
            f"canary prompt file {p} not found (a JSONL of {{'turns': [...]}} records, e.g. gsm8k.jsonl)"
        )
    if num_prompts < 1:
        raise CanaryError(f"--num-prompts must be >= 1, got {num_prompts}")
    prompts, bad = read_benchmark_file(p)
    if not prompts:
        first = f" (first bad line {bad[0].line}: {bad[0].reason})" if bad else ""
        raise CanaryError(f"canary prompt file {p} holds no usable {{'turns': [...]}} record{first}")
    return [q.turns[0] for q in select_prompts(prompts, num_prompts, seed)]


def _first(d: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def _positions(histogram: Any) -> tuple[float, ...] | None:
    if not isinstance(histogram, list) or len(histogram) < 2:
        return None
    counts = [float(x) for x in histogram]
    return tuple(sum(counts[i + 1 :]) for i in range(len(counts) - 1))


def _sglang_sample(details: Mapping[str, Any], completion_tokens: float | None) -> AcceptanceSample | None:
    steps = details.get("spec_verify_ct")
    if steps is None:
        return None
    steps = float(steps)
    accepted = _first(details, "spec_num_correct_drafts", "spec_accepted_drafts", "spec_accept_token_num")
    proposed = _first(details, "spec_num_proposed_drafts", "spec_proposed_drafts", "spec_draft_token_num")
    if accepted is None:
        if completion_tokens is None:
            return None
        accepted = max(completion_tokens - steps, 0.0)  # accept length = completion_tokens / spec_verify_ct
    hist = _first(details, "spec_correct_drafts_histogram", "spec_acceptance_histogram")
    return AcceptanceSample(
        steps, float(accepted), None if proposed is None else float(proposed), _positions(hist)
    )


def _vllm_sample(spec: Mapping[str, Any]) -> AcceptanceSample | None:
    steps = spec.get("num_spec_steps")
    hist = spec.get("acceptance_histogram")
    if steps is None and isinstance(hist, list):
        steps = sum(hist)
    if steps is None:
        return None
    accepted = spec.get("num_accepted_draft_tokens")
    if accepted is None and spec.get("mean_acceptance_length") is not None:
        accepted = (float(spec["mean_acceptance_length"]) - 1.0) * float(steps)
    if accepted is None:
        return None
    proposed = spec.get("num_draft_tokens")
    return AcceptanceSample(
        float(steps), float(accepted), None if proposed is None else float(proposed), _positions(hist)
    )


def sample_from_response(body: Mapping[str, Any]) -> AcceptanceSample | None:
    """The speculative counts of one chat/completions response body, or None if it has none."""
    usage = body.get("usage") or {}
    completion = usage.get("completion_tokens") if isinstance(usage, Mapping) else None
    completion = None if completion is None else float(completion)
    sglext = body.get("sglext")
    if isinstance(sglext, Mapping) and isinstance(sglext.get("spec_tokens_details"), Mapping):
        return _sglang_sample(sglext["spec_tokens_details"], completion)
    meta = body.get("meta_info")
    if isinstance(meta, Mapping) and "spec_verify_ct" in meta:
        meta_completion = meta.get("completion_tokens", completion)
        return _sglang_sample(meta, None if meta_completion is None else float(meta_completion))
    for holder in (body, *(c for c in body.get("choices") or [] if isinstance(c, Mapping))):
        metrics = holder.get("metrics")
        if isinstance(metrics, Mapping) and isinstance(metrics.get("speculative_decoding"), Mapping):
            return _vllm_sample(metrics["speculative_decoding"])
    return None


class CanaryRunner:
    """Sends the prompt set once per :meth:`collect` and sums the per-request statistics."""

    def __init__(
        self,
        engine: Engine,
        base_url: str,
        prompts: list[str],
        model: str | None = None,
        max_tokens: int = 128,
        api_key: str = "EMPTY",
        timeout: float = 120.0,
        client: Any = None,
    ) -> None:
        if not prompts:
            raise CanaryError("canary mode needs at least one prompt")
        if client is None:
            import openai

            client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=1)
        self.engine = engine
        self.base_url = base_url
        self.client = client
        self.prompts = prompts
        self.model = model
        self.max_tokens = max_tokens

    def _model(self) -> str:
        if self.model is None:
            models = self.client.models.list().data
            if not models:
                raise ValueError(f"{self.base_url}/models lists no model; pass --served-model")
            self.model = models[0].id
        return self.model

    def collect(self) -> Measurement:
        import openai

        extra = {"return_spec_tokens_details": True} if self.engine == "sglang" else None
        total: AcceptanceSample | None = None
        answered = without_stats = 0
        errors: list[str] = []
        for prompt in self.prompts:
            try:
                resp = self.client.chat.completions.create(
                    model=self._model(),
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=self.max_tokens,
                    temperature=0.0,
                    extra_body=extra,
                )
            except (openai.OpenAIError, ValueError) as e:
                errors.append(str(e).splitlines()[0][:200])
                continue
            answered += 1
            sample = sample_from_response(resp.to_dict())
            if sample is None:
                without_stats += 1
                continue
            total = sample if total is None else total + sample
        if not answered:
            return Measurement(
                reachable=False, detail=f"{self.base_url}: every canary request failed: {errors[0]}"
            )
        if total is None:
            hint = (
                "start vLLM with --per-request-spec-decode-metrics summary"
                if self.engine == "vllm"
                else "use an SGLang that answers return_spec_tokens_details (sglext.spec_tokens_details)"
            )
            return Measurement(
                reachable=False,
                detail=f"{self.base_url}: {without_stats} answers carried no per-request speculative statistics; {hint}",
            )
        detail = f"{self.base_url}: {answered}/{len(self.prompts)} canary answers"
        if errors:
            detail += f" ({len(errors)} failed: {errors[0]})"
        if total.verify_steps <= 0:
            return Measurement(
                speculating=False, detail=detail + "; spec_verify_ct is 0: no speculative decoding"
            )
        return Measurement(total, speculating=True, detail=detail)
