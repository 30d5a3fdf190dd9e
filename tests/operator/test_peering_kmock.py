"""Leader election against kmock: ``deepspec operator run`` started with the chart's container
arguments (leaderElection enabled, namespaced install) keeps itself alive in the chart's KopfPeering
object, and every request it makes on kopf's peering resource is granted by the chart's Role."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_python.chart import Chart
from operator_harness import CHART, NS, REPO, Cluster, allowed, operator_permissions, rbac_rules

pytestmark = pytest.mark.asyncio

VALUES = {"leaderElection": {"enabled": True}, "watchNamespaces": [NS], "metrics": {"enabled": False}}


async def test_operator_patches_the_charts_peering_object(cluster: Cluster, tmp_path: Path) -> None:
    cluster.kmock.resources["kopf.dev/v1/kopfpeerings"] = cluster.kmock.ResourceInfo(
        kind="KopfPeering", namespaced=True, verbs={"get", "list", "watch", "patch", "create"}
    )
    out = Chart.load(str(CHART)).render(VALUES, name="ds", namespace="deepspec-system")
    peering = yaml.safe_load(out["deepspec-operator/templates/peering.yaml"].split("---", 3)[-1])
    assert peering["kind"] == "KopfPeering" and peering["metadata"]["namespace"] == NS
    await cluster.api.create(peering)
    dep = yaml.safe_load(out["deepspec-operator/templates/deployment.yaml"])
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    args = [a for a in args if not a.startswith("--liveness")]  # no fixed port in tests
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env.update(POD_ID="ds-pod-a", PYTHONPATH=str(REPO))
    log = tmp_path / "operator.log"
    name = peering["metadata"]["name"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deepspec.cli", *args], env=env, stdout=sink, stderr=subprocess.STDOUT
        )
        try:
            status: dict[str, Any] = {}
            for _ in range(300):
                obj = await cluster.api.get("kopf.dev/v1", "KopfPeering", NS, name)
                status = (obj or {}).get("status") or {}
                if "ds-pod-a" in status or proc.poll() is not None:
                    break
                await asyncio.sleep(0.2)
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 15)
    assert "ds-pod-a" in status, log.read_text()[-3000:]
    assert status["ds-pod-a"]["priority"] > 0  # the random priority of cli.peering_priority
    used = {u for u in operator_permissions(cluster.kmock) if u[1] == "kopf.dev"}
    assert ("patch", "kopf.dev", "kopfpeerings") in used and ("watch", "kopf.dev", "kopfpeerings") in used
    rules = rbac_rules(VALUES, "Role")
    assert not [u for u in used if not allowed(rules, *u)], used
