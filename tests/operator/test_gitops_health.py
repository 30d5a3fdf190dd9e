"""GitOps health: the shipped Argo CD Lua health check (run by a Lua interpreter through ``lupa``) and
the kstatus conditions Flux reads, on the status the reconciler itself writes for every phase."""

from __future__ import annotations

from typing import Any

import pytest
from lupa import LuaRuntime
from operator_harness import CHART

from deepspec.operator.metrics import PHASES
from deepspec.operator.reconcile import IDLE, Reconciler
from deepspec.operator.spec import Serving

SCRIPT = (CHART / "argocd/health.lua").read_text()
EXPECTED = {"Succeeded": "Healthy", "Suspended": "Suspended", "Stalled": "Degraded", "GateFailed": "Degraded"}


def status_for(phase: str, serving: bool = False, generation: int = 3, observed: int = 3) -> dict[str, Any]:
    """The resource as the reconciler leaves it in ``phase`` (its own finish() writes the conditions)."""
    body = {"apiVersion": "deepspec.io/v1alpha1", "kind": "DraftTraining",
            "metadata": {"name": "d", "namespace": "ml", "generation": observed}}  # fmt: skip
    r = Reconciler(None, body, now=lambda: "2026-12-01T08:00:00Z")  # type: ignore[arg-type]
    r.set_phase(phase, f"in {phase}")
    if phase == "Stalled":
        r.condition("Stalled", True, "TrainFailed", "PyTorchJob failed")
    if serving:
        r.status.serving = Serving(runId="r0", macroAcceptLength=3.1)
    out = r.finish().status.model_dump(mode="json", exclude_none=True)
    body["metadata"]["generation"] = generation
    return {**body, "status": out}


def argocd_health(obj: dict[str, Any]) -> dict[str, str]:
    lua = LuaRuntime(unpack_returned_tuples=True)
    check = lua.eval("function(obj) " + SCRIPT + " end")
    result = check(lua.table_from(obj, recursive=True))
    return {"status": result["status"], "message": result["message"]}


@pytest.mark.parametrize("phase", PHASES)
def test_argocd_health_of_every_phase(phase: str) -> None:
    health = argocd_health(status_for(phase))
    assert health["status"] == EXPECTED.get(phase, "Progressing"), health
    assert health["message"]


def test_argocd_health_edge_cases() -> None:
    fresh = {
        "apiVersion": "deepspec.io/v1alpha1",
        "kind": "DraftTraining",
        "metadata": {"name": "d", "generation": 1},
    }
    assert argocd_health(fresh)["status"] == "Progressing"
    # a spec change the operator has not seen yet is not "Healthy" on the old status
    assert argocd_health(status_for("Succeeded", generation=4, observed=3))["status"] == "Progressing"
    retrain = argocd_health(status_for("Training", serving=True))
    assert retrain["status"] == "Progressing" and "keeps serving" in retrain["message"]
    gate = argocd_health(status_for("GateFailed", serving=True))
    assert gate["status"] == "Degraded" and "previous draft keeps serving" in gate["message"]


def kstatus(obj: dict[str, Any]) -> str:
    """kstatus' generic rule for custom resources (sigs.k8s.io/cli-utils pkg/kstatus/status/generic.go):
    Reconciling=True -> InProgress, Stalled=True -> Failed, otherwise Current (when observed)."""
    conds = {c["type"]: c["status"] for c in obj["status"].get("conditions", [])}
    if obj["status"].get("observedGeneration") != obj["metadata"]["generation"]:
        return "InProgress"
    if conds.get("Reconciling") == "True":
        return "InProgress"
    if conds.get("Stalled") == "True":
        return "Failed"
    return "Current"


@pytest.mark.parametrize("phase", PHASES)
def test_kstatus_reading_of_every_phase(phase: str) -> None:
    expected = (
        "Failed" if phase in ("Stalled", "GateFailed") else ("Current" if phase in IDLE else "InProgress")
    )
    assert kstatus(status_for(phase)) == expected


def test_serving_is_its_own_condition() -> None:
    """Ready follows the current run; Serving says a good draft serves (true during a retrain)."""
    conds = {c["type"]: c for c in status_for("Training", serving=True)["status"]["conditions"]}
    assert conds["Ready"]["status"] == "False" and conds["Serving"]["status"] == "True"
    conds = {c["type"]: c for c in status_for("Training")["status"]["conditions"]}
    assert conds["Serving"]["status"] == "False"
