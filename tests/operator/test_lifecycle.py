"""Lifecycle of a DraftTraining with the real kopf operator against kmock (a Kubernetes API mock).

The tests play the kubelet and the Job controller: they mark the server ready, Jobs succeeded or
failed, and put the evaluation summary in a pod's termination message; the operator (a 0.1 s
reconcile loop) must react. Waits poll the API for a condition with a deadline; nothing sleeps for
luck. Scenario tests that need a controlled clock drive the reconciler directly (test_scenarios.py).
"""

from __future__ import annotations

from typing import Any

import pytest
from operator_harness import (
    NS,
    SUMMARY,
    Cluster,
    allowed,
    clusterrole_rules,
    creates,
    drive_to_success,
    operator_permissions,
    rbac_rules,
)

from deepspec.operator.builders import Run

pytestmark = pytest.mark.asyncio


def cond(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


async def test_create_to_succeeded(cluster: Cluster, example: dict[str, Any]) -> None:
    await cluster.start()
    await cluster.api.create(example)
    run = Run.from_body(example, training_backend="pytorchjob")
    seeding = await cluster.wait_phase(
        run.name, "Seeding"
    )  # relative dataset path: the volume is seeded first
    assert cond(seeding, "Serving")["status"] == "False"
    assert not seeding["metadata"].get("finalizers")  # deleting it never waits for the operator
    await cluster.finish_job(run.child_name("seed"))
    starting = await cluster.wait_phase(run.name, "StartingServer")
    assert cond(starting, "ServerReady")["status"] == "False"
    assert cond(starting, "Reconciling")["status"] == "True"
    # no regeneration Job before the server is ready
    assert await cluster.api.get("batch/v1", "Job", NS, run.child_name("regenerate")) is None

    await drive_to_success(cluster, run, SUMMARY)
    done = await cluster.wait_phase(run.name, "Succeeded")
    st = done["status"]
    assert cond(done, "Ready")["status"] == "True"
    assert cond(done, "Ready")["observedGeneration"] == 1
    assert cond(done, "Stalled")["status"] == "False"
    assert st["observedGeneration"] == 1
    assert st["results"]["macroAcceptLength"] == pytest.approx(3.1)
    assert st["results"]["benchmarks"]["gsm8k"]["tau"] == pytest.approx(3.2)
    assert st["serving"]["runId"] == run.run_id and st["serving"]["targetRevision"] == "main"
    assert st["checkpointUri"] == "/data/x/draft/step_100"
    assert st["trainedTargetRevision"] == "main"
    for c in ("StorageReady", "Seeded", "Regenerated", "Merged", "Trained", "Evaluated", "GatePassed", "Exported", "Serving"):  # fmt: skip
        assert cond(done, c)["status"] == "True", c
    assert not done["metadata"].get("finalizers")
    pvc = await cluster.api.get("v1", "PersistentVolumeClaim", NS, run.pvc_name)
    assert pvc is not None and not pvc["metadata"].get("ownerReferences")  # Retain: outlives the resource

    # every child was created exactly once (GET before POST; 409 would mean a duplicate attempt)
    counts = creates(cluster)
    assert counts and max(counts.values()) == 1, counts
    # children carry an owner reference and none of the resource's own labels
    job = await cluster.api.get("batch/v1", "Job", NS, run.child_name("merge"))
    assert job["metadata"]["ownerReferences"][0]["uid"] == example["metadata"]["uid"]
    assert "team" not in job["metadata"]["labels"]
    # Events were posted on transitions
    events = [
        r.data
        for r in list(cluster.kmock)
        if r.method.value == "POST" and r.resource and r.resource.plural == "events"
    ]
    assert {"StartingServer", "Succeeded"} <= {e["reason"] for e in events}
    assert_rbac_covers(cluster)


def assert_rbac_covers(cluster: Cluster, deleted: bool = False) -> None:
    """Every verb the operator (kopf + our client) used is granted by the chart's ClusterRole and by
    the Role of a namespaced install; children with blockOwnerDeletion need drafttrainings/finalizers."""
    used = operator_permissions(cluster.kmock)
    assert ("patch", "deepspec.io", "drafttrainings/status") in used
    if deleted:
        assert ("delete", "apps", "deployments") in used
    if any(r.data and any(o.get("blockOwnerDeletion") for o in (r.data.get("metadata") or {}).get("ownerReferences", []))
           for r in list(cluster.kmock) if r.method.value == "POST"):  # fmt: skip
        used.add(("update", "deepspec.io", "drafttrainings/finalizers"))
    for rules, what in [
        (clusterrole_rules(), "ClusterRole"),
        (rbac_rules({"watchNamespaces": [NS]}, "Role"), "Role (namespaced install)"),
    ]:
        missing = sorted(u for u in used if not allowed(rules, *u))
        assert not missing, f"{what} lacks {missing}"


async def test_revision_bump_starts_new_run_and_keeps_serving(
    cluster: Cluster, example: dict[str, Any]
) -> None:
    await cluster.start()
    await cluster.api.create(example)
    run1 = Run.from_body(example, training_backend="pytorchjob")
    await drive_to_success(cluster, run1, SUMMARY)
    await cluster.wait_phase(run1.name, "Succeeded")

    await cluster.api.patch("deepspec.io/v1alpha1", "DraftTraining", NS, run1.name,
                            {"metadata": {"generation": 2}, "spec": {"target": {"revision": "v2"}}})  # fmt: skip
    bumped = await cluster.dt(run1.name)
    run2 = Run.from_body(bumped, training_backend="pytorchjob")
    assert run2.run_id != run1.run_id
    await cluster.wait_child("apps/v1", "Deployment", run2.child_name("server"))
    mid = await cluster.wait_phase(run1.name, "StartingServer")
    assert mid["status"]["run"]["id"] == run2.run_id
    assert mid["status"]["serving"]["runId"] == run1.run_id  # old draft keeps serving
    assert mid["status"]["serving"]["targetRevision"] == "main"
    assert cond(mid, "Ready")["status"] == "False"
    assert cond(mid, "Serving")["status"] == "True"  # a good draft keeps serving during the retrain
    # children of the superseded run are gone (nothing of it can hold a GPU)
    for kind, api_version, stage in [
        ("Deployment", "apps/v1", "server"),
        ("PyTorchJob", "kubeflow.org/v1", "train"),
    ]:
        assert await cluster.api.get(api_version, kind, NS, run1.child_name(stage)) is None, stage

    summary2 = {
        **SUMMARY,
        "target_revision": "v2",
        "checkpoint": "/data/y/draft/step_200",
        "macro_accept_length": 3.3,
    }
    # the serving draft is re-evaluated on v2 (2.9 there): the new draft (3.3) beats it
    await drive_to_success(
        cluster, run2, summary2, serving_on_new_target={**SUMMARY, "macro_accept_length": 2.9}
    )
    done = await cluster.wait_phase(run1.name, "Succeeded")
    assert done["status"]["serving"]["runId"] == run2.run_id
    assert done["status"]["serving"]["targetRevision"] == "v2"
    promotion = done["status"]["promotion"]
    assert promotion["promoted"] is True and promotion["servingAcceptLength"] == pytest.approx(2.9)
    assert done["status"]["observedGeneration"] == 2
    assert_rbac_covers(cluster, deleted=True)
