"""Fixtures of the operator tests (helpers live in operator_harness.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from operator_harness import NS, Cluster, load_example, write_kubeconfig


@pytest.fixture
def example() -> dict[str, Any]:
    """The small example as the API server would store it (namespace, uid, generation)."""
    body = load_example("minimal.yaml")
    body["metadata"].update(namespace=NS, uid="0b6d2c3e-uid", generation=1, resourceVersion="1")
    body["spec"]["maxRetries"] = 1
    return body


@pytest_asyncio.fixture
async def cluster(kmock: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    """kmock serving the kinds the operator uses, with a (not yet started) operator.

    The operator finds the mock API through a kubeconfig, as it would outside a cluster.
    """
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url))))
    c = Cluster(kmock)
    c.declare()
    yield c
    if c.task is not None:
        await c.stop()
    await c.api.close()
