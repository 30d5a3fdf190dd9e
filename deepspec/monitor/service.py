"""The monitor loop and its Prometheus exposition.

:class:`Monitor` measures (one ``collect()`` of a scrape or canary source), keeps a sliding window,
decides drift with :func:`deepspec.monitor.drift.evaluate_drift` and exposes the result through a
custom collector (``deepspec_monitor_*`` gauges, labelled ``model``, ``draft_version``, ``engine``
and ``mode``). The clock is injected, so a test drives it without sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from deepspec.monitor.drift import (
    Baseline,
    DriftPolicy,
    DriftState,
    DriftStatus,
    Observation,
    evaluate_drift,
    save_baseline,
)
from deepspec.monitor.scrape import Measurement
from deepspec.monitor.window import SlidingWindow, WindowStats


class Source(Protocol):
    def collect(self) -> Measurement: ...


@dataclass(frozen=True)
class MonitorLabels:
    model: str
    draft_version: str
    engine: str
    mode: str  # scrape | canary

    def names(self) -> list[str]:
        return ["model", "draft_version", "engine", "mode"]

    def values(self) -> list[str]:
        return [self.model, self.draft_version, self.engine, self.mode]


class Monitor:
    """Measure, window, decide; thread-safe reads for the exporter."""

    def __init__(
        self,
        source: Source,
        labels: MonitorLabels,
        policy: DriftPolicy,
        window_s: float,
        baseline: Baseline | None = None,
        learn_baseline_to: str | Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.labels = labels
        self.policy = policy
        self.window = SlidingWindow(window_s)
        self.baseline = baseline
        self.learn_baseline_to = Path(learn_baseline_to) if learn_baseline_to else None
        self.clock = clock
        self.status: DriftStatus | None = None
        self.stats: WindowStats | None = None
        self.last: Measurement | None = None
        self.last_success_at: float | None = None
        self.measurements = 0
        self.failures = 0
        self._lock = threading.Lock()

    def tick(self) -> DriftStatus:
        """One measurement and decision."""
        now = self.clock()
        try:
            m = self.source.collect()
        except Exception as e:  # a long-running service: an unexpected answer is missing data, not a crash
            m = Measurement(reachable=False, detail=f"measurement failed: {type(e).__name__}: {e}")
        with self._lock:
            self.measurements += 1
            if m.reachable:
                self.last_success_at = now
            else:
                self.failures += 1
            if m.sample is not None:
                self.window.add(now, m.sample)
            stats = self.window.stats(now)
            self._maybe_learn(stats, m, now)
            obs = Observation(stats.accept_length, stats.verify_steps, m.reachable, m.speculating, m.detail)
            self.status = evaluate_drift(self.status, obs, self.baseline, self.policy, now)
            self.stats, self.last = stats, m
            return self.status

    def _maybe_learn(self, stats: WindowStats, m: Measurement, now: float) -> None:
        """With ``learn_baseline_to`` and no baseline: the first full window becomes the baseline."""
        if self.baseline is not None or self.learn_baseline_to is None or not m.reachable:
            return
        length = stats.accept_length
        if (
            length is None
            or stats.verify_steps < self.policy.min_verify_steps
            or length <= self.policy.broken_below
        ):
            return
        stamp = datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.baseline = Baseline(length, self.labels.draft_version, recorded_at=stamp, source="learned")
        save_baseline(self.learn_baseline_to, self.baseline)

    def set_baseline(self, baseline: Baseline | None) -> None:
        """A new draft passed its gate (or was rolled back): compare with its accepted length from now on."""
        with self._lock:
            self.baseline = baseline
            if self.status is not None:
                self.status = replace(self.status, below_since=None, last_below_at=None)

    def run(self, interval_s: float, stop: threading.Event, max_ticks: int | None = None) -> None:
        """Tick every ``interval_s`` until ``stop`` is set (or ``max_ticks`` measurements)."""
        while not stop.is_set():
            status = self.tick()
            print(
                f"deepspec monitor: {status.state.value}"
                + (f" accept_length={status.observed:.3f}" if status.observed is not None else "")
                + (f" baseline={status.baseline:.3f}" if status.baseline is not None else "")
                + f" steps={status.verify_steps:g} ({status.reason})",
                flush=True,
            )
            if max_ticks is not None and self.measurements >= max_ticks:
                return
            stop.wait(interval_s)


class MonitorCollector(Collector):
    """``deepspec_monitor_*`` families from the monitor's last decision, built at scrape time."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        m = self.monitor
        names, values = m.labels.names(), m.labels.values()
        with m._lock:
            status, stats, now = m.status, m.stats, m.clock()
            measurements, failures, last_ok = m.measurements, m.failures, m.last_success_at

        def gauge(
            name: str, doc: str, value: float | None, extra: dict[str, str] | None = None
        ) -> GaugeMetricFamily:
            fam = GaugeMetricFamily(f"deepspec_monitor_{name}", doc, labels=[*names, *(extra or {})])
            if value is not None:
                fam.add_metric([*values, *(extra or {}).values()], value)
            return fam

        yield gauge("up", "1 while the monitor runs", 1.0)
        yield gauge(
            "accept_length",
            "Live accepted length over the window (accepted draft tokens per verification step + 1)",
            stats.accept_length if stats else None,
        )
        yield gauge(
            "acceptance_ratio",
            "Live accepted / proposed draft tokens over the window",
            stats.acceptance_ratio if stats else None,
        )
        pos = GaugeMetricFamily(
            "deepspec_monitor_position_acceptance",
            "Share of verification steps that accepted the draft token at this position (0-based)",
            labels=[*names, "position"],
        )
        for i, v in enumerate(stats.position_acceptance if stats else ()):
            pos.add_metric([*values, str(i)], v)
        yield pos
        yield gauge(
            "window_verify_steps",
            "Verification steps in the window (the evidence behind the live value)",
            stats.verify_steps if stats else 0.0,
        )
        yield gauge(
            "baseline_accept_length",
            "Accepted length of the serving draft when it passed its gate",
            m.baseline.accept_length if m.baseline else None,
        )
        yield gauge("drift_ratio", "Live accepted length / baseline", status.ratio if status else None)
        yield gauge("drift", "1 when the live value stayed below the baseline for the configured duration",
                    1.0 if status and status.drift else 0.0)  # fmt: skip
        below = now - status.below_since if status and status.below_since is not None else 0.0
        yield gauge("below_baseline_seconds", "How long the live value has been below the threshold", below)
        state = GaugeMetricFamily(
            "deepspec_monitor_state", "1 for the current monitor state", labels=[*names, "state"]
        )
        current = status.state if status else None
        for s in DriftState:
            state.add_metric([*values, s.value], 1.0 if s is current else 0.0)
        yield state
        yield gauge(
            "last_success_timestamp_seconds", "Unix time of the last measurement that got metrics", last_ok
        )
        total = CounterMetricFamily("deepspec_monitor_measurements", "Measurements taken", labels=names)
        total.add_metric(values, measurements)
        yield total
        failed = CounterMetricFamily(
            "deepspec_monitor_measurement_failures", "Measurements that got no metrics", labels=names
        )
        failed.add_metric(values, failures)
        yield failed


def serve_metrics(monitor: Monitor, port: int, addr: str = "0.0.0.0") -> tuple[int, CollectorRegistry]:
    """Start the /metrics HTTP server in a daemon thread; returns the bound port."""
    registry = CollectorRegistry()
    registry.register(MonitorCollector(monitor))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server.server_port, registry
