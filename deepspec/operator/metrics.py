"""Prometheus metrics of the operator: a custom collector over the resources' status.

Gauges are computed at scrape time from the last status seen for each ``DraftTraining`` (kept in a
:class:`StatusStore` that the handlers update), so they never drift from ``kubectl get dt``.
Counters of reconcile passes and errors are ordinary prometheus-client counters.
"""

from __future__ import annotations

import calendar
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PHASES = (
    "Pending", "Seeding", "StartingServer", "Regenerating", "Merging", "CachingFeatures", "Training",
    "Evaluating", "Exporting", "Publishing", "Succeeded", "GateFailed", "Stalled", "Suspended",
)  # fmt: skip


class StatusStore:
    """Thread-safe map (namespace, name) -> last seen resource body."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str], dict[str, Any]] = {}

    def put(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        with self._lock:
            self._items[(meta.get("namespace", ""), meta["name"])] = {
                "spec": dict(body.get("spec") or {}),
                "status": dict(body.get("status") or {}),
            }

    def remove(self, namespace: str, name: str) -> None:
        with self._lock:
            self._items.pop((namespace, name), None)

    def items(self) -> list[tuple[tuple[str, str], dict[str, Any]]]:
        with self._lock:
            return list(self._items.items())


def _ts(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


class DraftTrainingCollector(Collector):
    """``drafttraining_*`` gauges built from the stored status at each scrape."""

    def __init__(self, store: StatusStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        key = ["namespace", "name"]
        info = GaugeMetricFamily(
            "drafttraining_info", "DraftTraining identity (always 1)",
            labels=[*key, "algorithm", "target_model", "target_revision", "run_id", "serving_target_revision"],
        )  # fmt: skip
        phase = GaugeMetricFamily("drafttraining_phase", "1 for the current phase", labels=[*key, "phase"])
        acc = GaugeMetricFamily(
            "drafttraining_eval_accept_length", "Accepted length per benchmark (latest evaluation)",
            labels=[*key, "dataset"],
        )  # fmt: skip
        ratio = GaugeMetricFamily(
            "drafttraining_eval_acceptance_ratio", "Acceptance ratio per benchmark (latest evaluation)",
            labels=[*key, "dataset"],
        )  # fmt: skip
        macro = GaugeMetricFamily(
            "drafttraining_eval_macro_accept_length", "Macro accepted length", labels=key
        )
        evaluated = GaugeMetricFamily(
            "drafttraining_eval_timestamp_seconds", "Unix time of the latest evaluation", labels=key
        )
        base = GaugeMetricFamily(
            "drafttraining_baseline_accept_length", "Accepted length to beat (serving draft, else spec baseline)",
            labels=key,
        )  # fmt: skip
        serving = GaugeMetricFamily(
            "drafttraining_serving_accept_length", "Accepted length of the serving draft", labels=key
        )
        mismatch = GaugeMetricFamily(
            "drafttraining_target_revision_mismatch",
            "1 when a draft serves and spec.target.revision differs from the revision it was evaluated on "
            "(0 before the first draft serves: a first run is not a mismatch)",
            labels=key,
        )
        run_evaluated = GaugeMetricFamily(
            "drafttraining_run_evaluated", "1 when the current run has an evaluation result", labels=key
        )
        run_started = GaugeMetricFamily(
            "drafttraining_run_started_timestamp_seconds", "Unix time the current run started", labels=key
        )
        retries = GaugeMetricFamily(
            "drafttraining_stage_retries", "Re-creations of a stage", labels=[*key, "stage"]
        )
        for (ns, name), body in sorted(self.store.items()):
            spec, status = body["spec"], body["status"]
            lv = [ns, name]
            target = spec.get("target") or {}
            results = status.get("results") or {}
            serving_st = status.get("serving") or {}
            run = status.get("run") or {}
            info.add_metric(
                [*lv, (spec.get("training") or {}).get("algorithm", "eagle3"), str(target.get("model", "")),
                 str(target.get("revision") or ""), str(run.get("id") or ""), str(serving_st.get("targetRevision") or "")],
                1.0,
            )  # fmt: skip
            current = status.get("phase") or "Pending"
            for p in PHASES if current in PHASES else (*PHASES, current):
                phase.add_metric([*lv, p], 1.0 if p == current else 0.0)
            for ds, r in sorted((results.get("benchmarks") or {}).items()):
                if r.get("tau") is not None:
                    acc.add_metric([*lv, ds], float(r["tau"]))
                if r.get("acceptance_ratio") is not None:
                    ratio.add_metric([*lv, ds], float(r["acceptance_ratio"]))
            if results.get("macroAcceptLength") is not None:
                macro.add_metric(lv, float(results["macroAcceptLength"]))
            if (t := _ts(results.get("evaluatedAt"))) is not None:
                evaluated.add_metric(lv, t)
            b = serving_st.get("macroAcceptLength")
            if b is None:
                b = (spec.get("evaluation") or {}).get("baselineAcceptLength")
            if b is not None:
                base.add_metric(lv, float(b))
            if serving_st.get("macroAcceptLength") is not None:
                serving.add_metric(lv, float(serving_st["macroAcceptLength"]))
            serving_now = bool(serving_st.get("runId"))
            evaluated_rev = serving_st.get("targetRevision") or None
            mismatch.add_metric(
                lv, 1.0 if serving_now and (target.get("revision") or None) != evaluated_rev else 0.0
            )
            if run.get("id"):
                run_evaluated.add_metric(lv, 1.0 if results.get("runId") == run["id"] else 0.0)
            if (t := _ts(run.get("startedAt"))) is not None:
                run_started.add_metric(lv, t)
            for stage, n in sorted((run.get("attempts") or {}).items()):
                retries.add_metric([*lv, stage], float(n))
        yield from (
            info, phase, acc, ratio, macro, evaluated, base, serving, mismatch, run_evaluated, run_started, retries
        )  # fmt: skip


class OperatorMetrics:
    """The registry served on /metrics: the collector plus reconcile counters."""

    def __init__(self, store: StatusStore | None = None) -> None:
        self.store = store or StatusStore()
        self.registry = CollectorRegistry()
        self.registry.register(DraftTrainingCollector(self.store))
        self.reconciles = Counter(
            "drafttraining_reconcile", "Reconcile passes", ["result"], registry=self.registry
        )
        self.errors = Counter(
            "drafttraining_reconcile_errors", "Reconcile passes that raised", ["namespace", "name", "reason"],
            registry=self.registry,
        )  # fmt: skip
        self.last_loop = Gauge(
            "drafttraining_reconcile_loop_timestamp_seconds",
            "End of the operator's last pass over all resources (liveness)",
            registry=self.registry,
        )

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP server in a thread; returns the bound port (0 = pick one)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(server.server_port)
