"""Scrape mode: read an engine's Prometheus ``/metrics`` and turn it into acceptance increments.

Each engine needs its own semantics (checked in the engines' sources):

vLLM (``vllm/v1/spec_decode/metrics.py``, vllm-project/vllm @ ee4ceaae5953d367d8edd2132fd86d6c42506e1e,
class ``SpecDecodingProm``): four prometheus-client *counters*, labelled ``model_name`` and
``engine`` (``vllm/v1/metrics/loggers.py``: ``labelnames = ["model_name", "engine"]``) and, for the
last one, ``position``; prometheus-client exposes them with a ``_total`` suffix and a
``_created`` timestamp:

* ``vllm:spec_decode_num_drafts`` - verification steps,
* ``vllm:spec_decode_num_draft_tokens`` - draft tokens proposed,
* ``vllm:spec_decode_num_accepted_tokens`` - draft tokens accepted,
* ``vllm:spec_decode_num_accepted_tokens_per_pos`` - accepted at each draft position.

The class docstring gives the mean acceptance length as ``1 + rate(accepted) / rate(drafts)``: we
difference each counter between two scrapes. A counter that went down, or whose ``_created``
timestamp changed, belongs to a restarted server: its increase is its current value (Prometheus'
``increase()`` rule), never a negative delta that would fake a drop. A non-speculative vLLM has no
``vllm:spec_decode_*`` series at all (``SpecDecodingProm.__init__`` returns early).

SGLang (``python/sglang/srt/metrics/collector.py``, sgl-project/sglang @
00ae9c1590d2d0bb6c0bfff39e312c34ae3dd538, ``SchedulerMetricsCollector``): two *gauges*,
``sglang:spec_accept_length`` and ``sglang:spec_accept_rate`` (labels ``model_name``,
``engine_type``, ``tp_rank``, ``pp_rank``...). What the gauge holds depends on the build:

* ``interval`` (upstream; ``python/sglang/srt/managers/scheduler_metrics_mixin.py`` @
  78ac30c2056f2c25089c1d3203c3d5c13dc3d946, ``log_decode_stats``): accepted tokens / forward
  count over the last ``decode_log_interval`` decode batches, then reset. The gauge keeps its last
  value while the server is idle, so a value only counts when ``sglang:generation_tokens_total``
  moved; it is weighted by the tokens generated since the previous scrape.
* ``cumulative``: builds that export the lifetime running average (the scheduler's
  ``spec_total_num_accepted_tokens / spec_total_num_forward_ct``, which upstream reports as
  ``avg_spec_accept_length`` in ``get_internal_state``) never reset it, so a drop would show only
  slowly. With G the generated-token counter and A the average, the lifetime verification count is
  G / A; the window value is (G2 - G1) / (G2/A2 - G1/A1).
* ``counters``: builds whose tokenizer collector has ``sglang:spec_verify_calls_total`` next to
  ``sglang:generation_tokens_total`` (incremented with each finished request's ``spec_verify_ct``
  and completion tokens): accepted length = delta tokens / delta verify calls, SGLang's own
  per-request definition (``completion_tokens / spec_verify_ct``) summed over requests.

``auto`` picks ``counters`` when the counter is exported and ``interval`` otherwise. In every mode
a gauge at 0 with traffic flowing means the server does not speculate (``log_decode_stats`` sets
0 when ``spec_algorithm.is_none()``), which is its own state, not a drift.
"""

from __future__ import annotations

import http.client
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from prometheus_client.parser import text_string_to_metric_families

from deepspec.monitor.window import AcceptanceSample

Engine = Literal["vllm", "sglang"]
SGLangGaugeMode = Literal["auto", "interval", "cumulative", "counters"]

VLLM_DRAFTS = "vllm:spec_decode_num_drafts"
VLLM_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
VLLM_ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
VLLM_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"
SGLANG_ACCEPT_LENGTH = "sglang:spec_accept_length"
SGLANG_ACCEPT_RATE = "sglang:spec_accept_rate"
SGLANG_GEN_TOKENS = "sglang:generation_tokens_total"
SGLANG_VERIFY_CALLS = "sglang:spec_verify_calls_total"

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Measurement:
    """What one source saw this time: an increment, or why there is none."""

    sample: AcceptanceSample | None = None
    reachable: bool = True
    speculating: bool | None = None
    detail: str = ""


def http_get(url: str, timeout: float = 10.0) -> str:
    """GET a metrics page; raises ``OSError`` (``URLError``, timeouts) on failure."""
    req = urllib.request.Request(url, headers={"Accept": "text/plain"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read().decode("utf-8", errors="replace")


@dataclass
class _Series:
    value: float
    created: float | None = None


def _parse(text: str) -> dict[str, dict[Labels, _Series]]:
    """Sample name -> labels -> value, with prometheus-client's ``_created`` folded in."""
    out: dict[str, dict[Labels, _Series]] = defaultdict(dict)
    created: dict[str, dict[Labels, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = tuple(sorted(s.labels.items()))
            if s.name.endswith("_created"):
                created[s.name[: -len("_created")]][key] = s.value
            else:
                out[s.name][key] = _Series(s.value)
    for base, per_labels in created.items():
        for name in (base, base + "_total"):
            for key, ts in per_labels.items():
                if key in out.get(name, {}):
                    out[name][key].created = ts
    return out


def _pick(series: dict[str, dict[Labels, _Series]], base: str) -> dict[Labels, _Series]:
    """A counter's series whether it was exposed as ``base_total`` or (untyped) ``base``."""
    return series.get(base + "_total") or series.get(base) or {}


def _model_of(labels: Labels) -> str | None:
    return dict(labels).get("model_name")


class CounterTracker:
    """Increase of each counter series between two scrapes, robust to restarts."""

    def __init__(self) -> None:
        self._prev: dict[tuple[str, Labels], _Series] = {}
        # True once the endpoint has been scraped: a labelled counter that appears later was born
        # since then (prometheus-client exposes a labelled series from its first ``inc``)
        self.settled = False

    def increase(self, name: str, labels: Labels, now: _Series) -> float | None:
        """None for a series present at the first scrape (nothing to difference against)."""
        key = (name, labels)
        prev = self._prev.get(key)
        self._prev[key] = now
        if prev is None:
            return now.value if self.settled else None
        restarted = now.value < prev.value or (
            now.created is not None and prev.created is not None and now.created != prev.created
        )
        return now.value if restarted else now.value - prev.value

    def total_increase(self, name: str, series: dict[Labels, _Series]) -> float | None:
        """Sum over series; None when no series had a previous value."""
        incs = [self.increase(name, labels, s) for labels, s in series.items()]
        known = [i for i in incs if i is not None]
        return sum(known) if known else None


class EndpointScraper:
    """One ``/metrics`` URL of one engine; keeps the previous scrape to difference against."""

    def __init__(
        self,
        engine: Engine,
        url: str,
        model: str | None = None,
        sglang_gauges: SGLangGaugeMode = "auto",
        fetch: Callable[[str], str] = http_get,
    ) -> None:
        if engine not in ("vllm", "sglang"):
            raise ValueError(f"engine must be 'vllm' or 'sglang', got {engine!r}")
        if sglang_gauges not in ("auto", "interval", "cumulative", "counters"):
            raise ValueError(
                f"sglang gauge mode must be auto|interval|cumulative|counters, got {sglang_gauges!r}"
            )
        self.engine = engine
        self.url = url
        self.model = model
        self.sglang_gauges = sglang_gauges
        self.fetch = fetch
        self.counters = CounterTracker()
        self.models_seen: list[str] = []
        # (tokens G, lifetime verification steps G / A, _created stamps of G) at the previous scrape
        self._cumulative_prev: tuple[float, float | None, tuple[float, ...]] | None = None

    def collect(self) -> Measurement:
        try:
            text = self.fetch(self.url)
        except (OSError, ValueError, http.client.HTTPException) as e:
            return Measurement(reachable=False, detail=f"{self.url}: {e}")
        try:
            series = _parse(text)
        except ValueError as e:
            return Measurement(reachable=False, detail=f"{self.url}: not Prometheus text ({e})")
        series = self._only_model(series)
        measured = self._vllm(series) if self.engine == "vllm" else self._sglang(series)
        self.counters.settled = True
        return measured

    def _only_model(self, series: dict[str, dict[Labels, _Series]]) -> dict[str, dict[Labels, _Series]]:
        self.models_seen = sorted({m for per in series.values() for k in per if (m := _model_of(k))})
        if self.model is None:
            return series
        kept = {
            name: {k: v for k, v in per.items() if _model_of(k) in (None, self.model)}
            for name, per in series.items()
        }
        return {name: per for name, per in kept.items() if per}

    def _not_found(self, default: str) -> str:
        if self.model and self.models_seen and self.model not in self.models_seen:
            return f"model {self.model!r} not among {self.models_seen} (check --served-model)"
        return default

    # vLLM ------------------------------------------------------------------------------------
    def _vllm(self, series: dict[str, dict[Labels, _Series]]) -> Measurement:
        drafts = _pick(series, VLLM_DRAFTS)
        if not drafts:
            if any(name.startswith("vllm:") for name in series) and not self._not_found(""):
                return Measurement(
                    speculating=False,
                    detail=f"{self.url}: vLLM answers without vllm:spec_decode_* series (no speculative decoding"
                    + (f" for model {self.model!r}" if self.model else "")
                    + ")",
                )
            what = self._not_found("no vllm: metrics (is this a vLLM /metrics endpoint?)")
            return Measurement(reachable=False, detail=f"{self.url}: {what}")
        d_drafts = self.counters.total_increase(VLLM_DRAFTS, drafts)
        d_accepted = self.counters.total_increase(VLLM_ACCEPTED, _pick(series, VLLM_ACCEPTED))
        d_proposed = self.counters.total_increase(VLLM_DRAFT_TOKENS, _pick(series, VLLM_DRAFT_TOKENS))
        by_pos: dict[int, dict[Labels, _Series]] = defaultdict(dict)
        for labels, s in _pick(series, VLLM_PER_POS).items():
            pos = dict(labels).get("position")
            if pos is not None and pos.isdigit():
                by_pos[int(pos)][labels] = s
        per_pos = [self.counters.total_increase(VLLM_PER_POS, by_pos[p]) for p in sorted(by_pos)]
        if d_drafts is None or d_accepted is None:
            return Measurement(speculating=True, detail=f"{self.url}: first scrape, counters recorded")
        positions = tuple(x or 0.0 for x in per_pos) if per_pos else None
        return Measurement(
            AcceptanceSample(d_drafts, d_accepted, d_proposed, positions),
            speculating=True,
            detail=f"{self.url}: +{d_drafts:g} drafts, +{d_accepted:g} accepted tokens",
        )

    # SGLang ----------------------------------------------------------------------------------
    def _sglang(self, series: dict[str, dict[Labels, _Series]]) -> Measurement:
        gauge = series.get(SGLANG_ACCEPT_LENGTH, {})
        verify = series.get(SGLANG_VERIFY_CALLS, {})
        tokens = series.get(SGLANG_GEN_TOKENS, {})
        mode = self.sglang_gauges
        if mode == "auto":
            mode = "counters" if verify else "interval"
        if not gauge and not verify:
            what = self._not_found("no sglang:spec_* metrics")
            return Measurement(
                reachable=False,
                detail=f"{self.url}: {what} (start SGLang with --enable-metrics; is this an SGLang endpoint?)",
            )
        d_tokens = self.counters.total_increase(SGLANG_GEN_TOKENS, tokens)
        # one gauge per scheduler (tp / pp / dp rank); a rank that never decoded holds 0, so only
        # ranks that report a value are averaged, and 0 everywhere means no speculation
        length = _mean_reported(gauge)
        rate = _mean_reported(series.get(SGLANG_ACCEPT_RATE, {}))
        if length is not None and length == 0.0 and d_tokens:
            return Measurement(
                speculating=False,
                detail=f"{self.url}: sglang:spec_accept_length is 0 while tokens are generated: no speculative decoding",
            )
        if mode == "counters":
            if not verify:
                return Measurement(reachable=False, detail=f"{self.url}: {SGLANG_VERIFY_CALLS} not exported")
            d_verify = self.counters.total_increase(SGLANG_VERIFY_CALLS, verify)
            if d_verify is None or d_tokens is None:
                return Measurement(speculating=True, detail=f"{self.url}: first scrape, counters recorded")
            if d_verify <= 0:
                return Measurement(speculating=True, detail=f"{self.url}: no finished speculative request")
            return Measurement(
                AcceptanceSample(d_verify, max(d_tokens - d_verify, 0.0)),
                speculating=True,
                detail=f"{self.url}: +{d_verify:g} verify calls, +{d_tokens:g} tokens",
            )
        if not tokens:
            return Measurement(
                reachable=False,
                detail=f"{self.url}: {SGLANG_GEN_TOKENS} missing: cannot tell fresh gauge values from stale ones",
            )
        if mode == "cumulative":
            return self._sglang_cumulative(tokens, length if length is not None and length >= 1.0 else None)
        if length is None or length < 1.0:
            return Measurement(
                speculating=None, detail=f"{self.url}: no speculative decode step reported yet"
            )
        if not d_tokens:
            return Measurement(
                speculating=True, detail=f"{self.url}: no tokens generated since the last scrape"
            )
        steps = d_tokens / length
        ratio = (rate * d_tokens, d_tokens) if rate is not None else None
        return Measurement(
            AcceptanceSample(steps, d_tokens - steps, reported_ratio=ratio),
            speculating=True,
            detail=f"{self.url}: accept length {length:.3f} over +{d_tokens:g} tokens",
        )

    def _sglang_cumulative(self, tokens: dict[Labels, _Series], average: float | None) -> Measurement:
        g = sum(s.value for s in tokens.values())
        created = tuple(sorted(s.created for s in tokens.values() if s.created is not None))
        # lifetime verification steps: tokens / running average (0 before any step on a fresh server)
        steps = g / average if average else (0.0 if g == 0 else None)
        prev, self._cumulative_prev = self._cumulative_prev, (g, steps, created)
        if average is None:
            return Measurement(
                speculating=None, detail=f"{self.url}: no speculative decode step reported yet"
            )
        if prev is None or prev[1] is None:
            return Measurement(speculating=True, detail=f"{self.url}: first scrape, running average recorded")
        g0, steps0, created0 = prev
        if g < g0 or (created and created0 and created != created0):
            g0, steps0 = 0.0, 0.0  # restarted: the running average started again from zero
        d_tokens, d_steps = g - g0, steps - steps0
        if d_tokens <= 0 or d_steps <= 0:
            return Measurement(
                speculating=True, detail=f"{self.url}: no tokens generated since the last scrape"
            )
        return Measurement(
            AcceptanceSample(d_steps, max(d_tokens - d_steps, 0.0)),
            speculating=True,
            detail=f"{self.url}: running average {average:.3f}, window {d_tokens / d_steps:.3f}",
        )


def _mean_reported(gauge: dict[Labels, _Series]) -> float | None:
    """Mean of the non-zero series; 0.0 when every series is 0; None without series."""
    if not gauge:
        return None
    reported = [s.value for s in gauge.values() if s.value > 0]
    return sum(reported) / len(reported) if reported else 0.0


class MetricsScraper:
    """Scrape mode over one or several replicas of one served model."""

    def __init__(
        self,
        engine: Engine,
        urls: list[str],
        model: str | None = None,
        sglang_gauges: SGLangGaugeMode = "auto",
        fetch: Callable[[str], str] = http_get,
    ) -> None:
        if not urls:
            raise ValueError("scrape mode needs at least one --metrics-url")
        self.engine = engine
        self.endpoints = [EndpointScraper(engine, u, model, sglang_gauges, fetch) for u in urls]

    def collect(self) -> Measurement:
        return combine([e.collect() for e in self.endpoints])


def combine(parts: list[Measurement]) -> Measurement:
    """Replicas summed: reachable if any answered; not speculating only if every answer says so."""
    answered = [p for p in parts if p.reachable]
    samples = [p.sample for p in answered if p.sample is not None]
    total = None
    for s in samples:
        total = s if total is None else total + s
    spec_flags = [p.speculating for p in answered if p.speculating is not None]
    speculating = any(spec_flags) if spec_flags else None
    return Measurement(
        total,
        reachable=bool(answered),
        speculating=speculating,
        detail="; ".join(p.detail for p in parts if p.detail),
    )
