"""The operator's kopf handlers: the liveness probe tracks the reconcile loop, not just the process."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import kopf
import pytest

from deepspec.operator.handlers import build_registry

pytestmark = pytest.mark.asyncio


def probe(registry: kopf.OperatorRegistry) -> Any:
    """The registered probe handler (kopf keeps registries in private attributes)."""
    return next(h.fn for h in registry._activities.get_all_handlers() if h.id == "reconcile_loop")


async def test_liveness_probe_fails_when_the_loop_stops() -> None:
    check = probe(build_registry(interval=10, metrics_port=None))
    alive = asyncio.get_running_loop().create_task(asyncio.sleep(60))
    memo = kopf.Memo(loop=alive, last_pass=time.time() - 5)
    assert await check(memo=memo) == pytest.approx(5, abs=1)
    memo.last_pass = time.time() - 600  # no pass for 10 minutes: stuck
    with pytest.raises(kopf.PermanentError, match="stuck"):
        await check(memo=memo)
    alive.cancel()
    memo.last_pass = time.time()
    await asyncio.sleep(0)
    with pytest.raises(kopf.PermanentError):  # the loop task died
        await check(memo=memo)


async def test_no_timer_so_no_finalizer() -> None:
    """kopf adds its finalizer for timers and daemons; the operator registers neither."""
    registry = build_registry(metrics_port=None)
    assert not list(registry._spawning.get_all_handlers())
