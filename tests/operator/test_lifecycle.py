"""Lifecycle of a DraftTraining with the real kopf operator against kmock (a Kubernetes API mock).

The tests play the kubelet and the Job controller: they mark the server ready, Jobs succeeded or
failed, and put the evaluation summary in a pod's termination message; the operator (a 0.1 s kopf
timer) must react. Waits poll the API for a condition with a deadline; nothing sleeps for luck.
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
)

from deepspec.operator.builders import Run

pytestmark = pytest.mark.asyncio


def cond(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


async def test_create_to_succeeded(cluster: Cluster, example: dict[str, Any]) -> None:
    await cluster.start()
    await cluster.api.create(example)
    run = Run.from_body(example, training_backend="pytorchjob")
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
    for c in ("StorageReady", "Regenerated", "Merged", "Trained", "Evaluated", "GatePassed", "Exported"):
        assert cond(done, c)["status"] == "True", c

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


def assert_rbac_covers(cluster: Cluster) -> None:
    """Every verb the operator (kopf + our client) used is granted by the chart's ClusterRole."""
    rules = clusterrole_rules()
    used = operator_permissions(cluster.kmock)
    assert ("patch", "deepspec.io", "drafttrainings/status") in used
    missing = sorted(u for u in used if not allowed(rules, *u))
    assert not missing, f"ClusterRole lacks {missing}"


async def test_failed_job_ends_stalled_after_retry_budget(cluster: Cluster, example: dict[str, Any]) -> None:
    await cluster.start()
    await cluster.api.create(example)  # maxRetries = 1
    run = Run.from_body(example, training_backend="pytorchjob")
    server = run.child_name("server")
    await cluster.wait_child("apps/v1", "Deployment", server)
    await cluster.set_status("apps/v1", "Deployment", server, {"readyReplicas": 1})
    first = run.child_name("regenerate")
    await cluster.wait_child("batch/v1", "Job", first)
    await cluster.finish_job(first, ok=False)
    retry = Run(**{**run.__dict__, "attempts": {"regenerate": 1}}).child_name("regenerate")
    assert retry == f"{first}-r1"
    await cluster.wait_child("batch/v1", "Job", retry)
    await cluster.finish_job(retry, ok=False)
    stalled = await cluster.wait_phase(run.name, "Stalled")
    c = cond(stalled, "Stalled")
    assert c["status"] == "True" and c["reason"] == "RegenerateFailed"
    assert "BackoffLimitExceeded" in c["message"]
    assert cond(stalled, "Ready")["status"] == "False"
    assert stalled["status"]["run"]["attempts"] == {"regenerate": 1}


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

    summary2 = {
        **SUMMARY,
        "target_revision": "v2",
        "checkpoint": "/data/y/draft/step_200",
        "macro_accept_length": 3.3,
    }
    await drive_to_success(cluster, run2, summary2)
    done = await cluster.wait_phase(run1.name, "Succeeded")
    assert done["status"]["serving"]["runId"] == run2.run_id
    assert done["status"]["serving"]["targetRevision"] == "v2"
    assert done["status"]["observedGeneration"] == 2
    assert_rbac_covers(cluster)


async def test_restart_mid_stage_creates_no_duplicate(cluster: Cluster, example: dict[str, Any]) -> None:
    """Two operator processes in turn, each with a fresh client and no memory, driven explicitly.

    (kmock stops answering after a kopf instance is torn down mid-watch, so the restart is played
    with the same handler code path kopf's timer runs: fetch, reconcile, write status.)
    """
    from deepspec.operator.kube import KubeApi
    from deepspec.operator.reconcile import apply_outcome, reconcile

    async def tick(api: KubeApi, times: int = 2) -> dict[str, Any]:
        for _ in range(times):
            body = await cluster.dt(example["metadata"]["name"])
            await apply_outcome(api, body, await reconcile(api, body))
        return await cluster.dt(example["metadata"]["name"])

    await cluster.api.create(example)
    run = Run.from_body(example, training_backend="pytorchjob")
    first = KubeApi.from_environment()
    assert (await tick(first))["status"]["phase"] == "StartingServer"
    await cluster.set_status("apps/v1", "Deployment", run.child_name("server"), {"readyReplicas": 1})
    assert (await tick(first))["status"]["phase"] == "Regenerating"
    await cluster.finish_job(run.child_name("regenerate"))
    await tick(first)
    await cluster.finish_job(run.child_name("merge"))
    assert (await tick(first))["status"]["phase"] == "Training"
    await first.close()
    before = creates(cluster)

    second = KubeApi.from_environment()  # the restarted operator
    mid = await tick(second, times=3)
    assert mid["status"]["phase"] == "Training"
    assert creates(cluster) == before  # nothing re-created
    await cluster.finish_job(run.child_name("train"), kind="PyTorchJob", api_version="kubeflow.org/v1")
    await tick(second)
    await cluster.add_eval_pod(run.child_name("evaluate"), SUMMARY)
    await cluster.finish_job(run.child_name("evaluate"))
    await tick(second)
    await cluster.finish_job(run.child_name("export"))
    done = await tick(second)
    await second.close()
    assert done["status"]["phase"] == "Succeeded"
    counts = creates(cluster)
    assert max(counts.values()) == 1, counts
    assert counts[("pytorchjobs", run.child_name("train"))] == 1
