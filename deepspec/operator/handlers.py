"""kopf handlers: a few lines each, over :mod:`deepspec.operator.reconcile` and the builders.

:func:`build_registry` returns a registry with

* a login handler: kopf's watches use the credentials of :func:`deepspec.operator.kube.load_configuration`
  (service account, else kubeconfig), re-read whenever the API server answers 401 (rotated token),
* a startup handler (API client over the same loader unless one is in ``memo``, standalone mode,
  /metrics server),
* a timer per ``DraftTraining`` (level-based reconcile every ``interval`` seconds),
* an event handler that keeps the metrics' status store current (no finalizer needed).
"""

from __future__ import annotations

from typing import Any

import kopf

from deepspec.operator.kube import KubeApi, KubeError, connection_info, load_configuration
from deepspec.operator.metrics import OperatorMetrics
from deepspec.operator.reconcile import apply_outcome, reconcile
from deepspec.operator.spec import GROUP, PLURAL, VERSION

DEFAULT_INTERVAL_S = 15.0


def build_registry(
    interval: float = DEFAULT_INTERVAL_S, metrics_port: int | None = 8080
) -> kopf.OperatorRegistry:
    """All handlers of the operator in a fresh registry (tests use a short interval)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        # kopf calls this again after any 401, so a rotated token file is read again at once
        return await connection_info(await load_configuration())

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        settings.peering.standalone = True
        settings.posting.level = 100  # our own Events only; kopf's log posting is noise
        if getattr(memo, "api", None) is None:
            memo.api = KubeApi.from_environment()
        if getattr(memo, "metrics", None) is None:
            memo.metrics = OperatorMetrics()
            if metrics_port is not None:
                memo.metrics.serve(metrics_port)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        if getattr(memo, "api", None) is not None:
            await memo.api.close()

    @kopf.timer(GROUP, VERSION, PLURAL, interval=interval, initial_delay=0, registry=registry)
    async def reconcile_timer(body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
        meta = body["metadata"]
        try:
            # the freshest object: kopf's body may predate our own last status patch
            raw = await memo.api.get(f"{GROUP}/{VERSION}", "DraftTraining", meta["namespace"], meta["name"])
            if raw is None:
                return
            outcome = await reconcile(memo.api, raw)
            patched = await apply_outcome(memo.api, raw, outcome)
        except KubeError as e:
            memo.metrics.reconciles.labels("error").inc()
            memo.metrics.errors.labels(meta.get("namespace", ""), meta["name"], str(e.status)).inc()
            raise kopf.TemporaryError(str(e), delay=interval) from e
        memo.metrics.reconciles.labels("ok").inc()
        memo.metrics.store.put(patched if isinstance(patched, dict) and "metadata" in patched else raw)
        for created in outcome.created:
            logger.info("created %s", created)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def track(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        body = event["object"]
        if getattr(memo, "metrics", None) is None:
            return
        if event.get("type") == "DELETED":
            memo.metrics.store.remove(body["metadata"].get("namespace", ""), body["metadata"]["name"])
        else:
            memo.metrics.store.put(body)

    return registry
