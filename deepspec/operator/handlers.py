"""kopf handlers: a few lines each, over :mod:`deepspec.operator.reconcile` and the builders.

:func:`build_registry` returns a registry with

* a login handler: kopf's watches use the credentials of :func:`deepspec.operator.kube.load_configuration`
  (service account, else kubeconfig), read again whenever the API server answers 401 (rotated token);
* a startup handler: the API client over the same loader (unless one is in ``memo``), the /metrics
  server, and the reconcile loop;
* an event handler that keeps the set of known ``DraftTraining`` objects and the metrics' status store
  current.

Why a loop of our own instead of ``@kopf.timer``: kopf puts its finalizer on every object a timer
serves (``requires_finalizer=True`` is hard-wired for timers and daemons in kopf 1.45), so deleting a
``DraftTraining`` would hang while the operator is down. Event handlers need no finalizer, and the
reconcile needs none either (children are garbage-collected through owner references).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import kopf

from deepspec.operator.kube import KubeApi, KubeError, connection_info, load_configuration
from deepspec.operator.metrics import OperatorMetrics
from deepspec.operator.reconcile import apply_outcome, reconcile
from deepspec.operator.spec import GROUP, PLURAL, VERSION

DEFAULT_INTERVAL_S = 15.0
log = logging.getLogger("deepspec.operator")


async def reconcile_one(memo: kopf.Memo, namespace: str, name: str) -> None:
    """Fetch the freshest object, reconcile it, write its status; errors are counted and logged."""
    try:
        raw = await memo.api.get(f"{GROUP}/{VERSION}", "DraftTraining", namespace, name)
        if raw is None:
            memo.known.discard((namespace, name))
            return
        outcome = await reconcile(memo.api, raw)
        patched = await apply_outcome(memo.api, raw, outcome)
    except KubeError as e:
        memo.metrics.reconciles.labels("error").inc()
        memo.metrics.errors.labels(namespace, name, str(e.status)).inc()
        log.warning("reconcile %s/%s: %s", namespace, name, e)
        return
    memo.metrics.reconciles.labels("ok").inc()
    memo.metrics.store.put(patched if isinstance(patched, dict) and "metadata" in patched else raw)
    for created in outcome.created:
        log.info("%s/%s: created %s", namespace, name, created)
    for deleted in outcome.deleted:
        log.info("%s/%s: deleted %s", namespace, name, deleted)


async def reconcile_loop(memo: kopf.Memo, interval: float) -> None:
    """Every ``interval`` seconds, one pass over every known resource (level-based, idempotent)."""
    while True:
        for namespace, name in sorted(memo.known):
            try:
                await reconcile_one(memo, namespace, name)
            except Exception:  # one bad resource (or a transient network error) must not stop the rest
                memo.metrics.reconciles.labels("error").inc()
                log.exception("reconcile %s/%s failed", namespace, name)
        memo.last_pass = time.time()
        memo.metrics.last_loop.set(memo.last_pass)
        await asyncio.sleep(interval)


def build_registry(
    interval: float = DEFAULT_INTERVAL_S, metrics_port: int | None = 8080, scanning: bool = True
) -> kopf.OperatorRegistry:
    """All handlers of the operator in a fresh registry (tests use a short interval).

    ``scanning=False`` (every watched namespace named exactly): kopf neither lists namespaces nor
    watches CustomResourceDefinitions, so a namespaced install needs no cluster-wide permission.
    """
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        # kopf calls this again after any 401, so a rotated token file is read again at once
        return await connection_info(await load_configuration())

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        settings.posting.level = 100  # our own Events only; kopf's log posting is noise
        if not scanning:
            settings.scanning.disabled = True
        if getattr(memo, "api", None) is None:
            memo.api = KubeApi.from_environment()
        if getattr(memo, "metrics", None) is None:
            memo.metrics = OperatorMetrics()
            if metrics_port is not None:
                memo.metrics.serve(metrics_port)
        memo.known = set()
        memo.loop = asyncio.get_running_loop().create_task(reconcile_loop(memo, interval))

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        task = getattr(memo, "loop", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if getattr(memo, "api", None) is not None:
            await memo.api.close()

    @kopf.on.probe(id="reconcile_loop", registry=registry)
    async def loop_alive(memo: kopf.Memo, **_: Any) -> float:
        """Liveness: seconds since the last full pass; an error (HTTP 500) when the loop is stuck."""
        task = getattr(memo, "loop", None)
        last = getattr(memo, "last_pass", None)
        age = time.time() - last if last else 0.0
        if task is None or task.done() or age > max(4 * interval, 120.0):
            raise kopf.PermanentError(
                f"reconcile loop not running or stuck ({age:.0f} s since its last pass)"
            )
        return age

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def track(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        body = event["object"]
        key = (body["metadata"].get("namespace", ""), body["metadata"]["name"])
        if event.get("type") == "DELETED":
            memo.known.discard(key)
            memo.metrics.store.remove(*key)
        else:
            memo.known.add(key)
            memo.metrics.store.put(body)

    return registry
