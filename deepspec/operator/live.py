"""The live monitor's decision, as the operator reads it: the monitor's own ``/metrics``.

The operator deploys ``deepspec monitor`` (one Deployment + Service per monitored resource) and reads
its ``deepspec_monitor_*`` gauges over HTTP at every pass: the same endpoint Prometheus scrapes, so
there is one source of truth, no write access for the monitor and no extra object to keep in sync.
The drift decision itself is the monitor's (:func:`deepspec.monitor.drift.evaluate_drift`); this
module only turns the exposition back into a :class:`~deepspec.monitor.drift.DriftStatus`.

An unreachable monitor (pod starting, Service without endpoints) reads as state ``missing``: never
drift, so it never triggers a retrain.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable

from prometheus_client.parser import text_string_to_metric_families

from deepspec.monitor.drift import DriftState, DriftStatus

MetricsReader = Callable[[str], Awaitable[str | None]]


async def http_metrics(url: str, timeout_s: float = 5.0) -> str | None:
    """GET ``url``; None on any connection problem or non-200 answer."""
    import aiohttp

    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
            return await resp.text() if resp.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None


def parse_monitor_metrics(text: str | None, draft_version: str, now: str) -> DriftStatus:
    """The monitor's decision for ``draft_version`` from its exposition text.

    A monitor still labelled with another draft version (not yet restarted after a promotion) or
    without any series is ``missing``: its figures are about another draft.
    """
    if not text:
        return DriftStatus(DriftState.MISSING, reason="monitor /metrics unreachable")
    values: dict[str, float] = {}
    state: DriftState | None = None
    versions: set[str] = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.startswith("deepspec_monitor_"):
                continue
            version = s.labels.get("draft_version", "")
            versions.add(version)
            if version != draft_version:
                continue
            if s.name == "deepspec_monitor_state" and s.value == 1.0:
                state = DriftState(s.labels["state"])
            elif "state" not in s.labels:
                values[s.name.removeprefix("deepspec_monitor_")] = s.value
    if draft_version not in versions:
        return DriftStatus(
            DriftState.MISSING,
            reason=f"monitor reports draft {sorted(versions) or 'none'}, not {draft_version}",
        )
    if state is None:  # no measurement yet
        return DriftStatus(DriftState.INSUFFICIENT_DATA, reason="the monitor has not decided yet")
    below = values.get("below_baseline_seconds", 0.0)
    now_s = dt.datetime.strptime(now, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()
    ratio = values.get("drift_ratio")
    return DriftStatus(
        state,
        observed=values.get("accept_length"),
        baseline=values.get("baseline_accept_length"),
        ratio=ratio,
        verify_steps=values.get("window_verify_steps", 0.0),
        below_since=now_s - below if below > 0 else None,
        reason=f"monitor state {state.value}" + (f", live/baseline {ratio:.3f}" if ratio is not None else ""),
    )
