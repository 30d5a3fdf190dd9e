"""Scenario tests of the reconciler (acceptance 3 and 4), pass by pass against kmock.

Each test drives the same code path the operator's loop runs (fetch, reconcile, write status) with a
client built from the kubeconfig, a fresh one per "process" where a restart matters, and a clock the
test controls (deadlines). The tests play the kubelet and the Job controllers.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import shlex
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cel_admission import admit
from operator_harness import NS, SUMMARY, Cluster, allowed, creates, operator_permissions, rbac_rules

from deepspec.operator.builders import Run, build_pvc
from deepspec.operator.kube import KubeApi
from deepspec.operator.reconcile import apply_outcome, reconcile

pytestmark = pytest.mark.asyncio
DT = ("deepspec.io/v1alpha1", "DraftTraining")


class Operator:
    """One operator process: its own API client and the test's clock."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.api = KubeApi.from_environment()
        self.clock = dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.timezone.utc)

    def now(self) -> str:
        return self.clock.strftime("%Y-%m-%dT%H:%M:%SZ")

    async def tick(self, times: int = 2) -> dict[str, Any]:
        for _ in range(times):
            body = await self.cluster.dt(self.name)
            await apply_outcome(self.api, body, await reconcile(self.api, body, now=self.now))
        return await self.cluster.dt(self.name)

    async def spec_patch(self, patch: dict[str, Any], annotations: dict[str, str] | None = None) -> None:
        body = await self.cluster.dt(self.name)
        meta: dict[str, Any] = {"generation": body["metadata"].get("generation", 1) + 1}
        if annotations:
            meta = {"annotations": annotations}
        await self.cluster.api.patch(
            *DT, NS, self.name, {"metadata": meta, **({"spec": patch} if patch else {})}
        )

    async def run(self) -> Run:
        return Run.from_body(await self.cluster.dt(self.name), training_backend="pytorchjob")


def cond(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


def events(cluster: Cluster) -> list[dict[str, Any]]:
    return [
        r.data
        for r in list(cluster.kmock)
        if r.method.value == "POST" and r.resource and r.resource.plural == "events"
    ]


async def finish(cluster: Cluster, run: Run, stage: str, ok: bool = True) -> None:
    kind, api = ("PyTorchJob", "kubeflow.org/v1") if stage == "train" else ("Job", "batch/v1")
    await cluster.finish_job(run.child_name(stage), ok=ok, kind=kind, api_version=api)


async def to_training(op: Operator) -> Run:
    """Create the example and walk it to a running training job."""
    c = op.cluster
    run = await op.run()
    assert (await op.tick())["status"]["phase"] == "Seeding"
    await finish(c, run, "seed")
    assert (await op.tick())["status"]["phase"] == "StartingServer"
    await c.set_status("apps/v1", "Deployment", run.child_name("server"), {"readyReplicas": 1})
    assert (await op.tick())["status"]["phase"] == "Regenerating"
    await finish(c, run, "regenerate")
    await op.tick()
    await finish(c, run, "merge")
    assert (await op.tick())["status"]["phase"] == "Training"
    return run


async def to_succeeded(op: Operator, summary: dict[str, Any] = SUMMARY) -> Run:
    run = await to_training(op)
    await finish(op.cluster, run, "train")
    await op.tick()
    await op.cluster.add_eval_pod(run.child_name("evaluate"), summary)
    await finish(op.cluster, run, "evaluate")
    await op.tick()
    await finish(op.cluster, run, "export")
    assert (await op.tick())["status"]["phase"] == "Succeeded"
    return run


@pytest_asyncio.fixture
async def op(cluster: Cluster, example: dict[str, Any]) -> Any:
    await cluster.api.create(example)
    o = Operator(cluster, example["metadata"]["name"])
    yield o
    await o.api.close()
    # whatever the scenario made the operator do, both shipped roles allow it
    used = operator_permissions(cluster.kmock) | {("update", "deepspec.io", "drafttrainings/finalizers")}
    for rules in (rbac_rules(), rbac_rules({"watchNamespaces": [NS]}, "Role")):
        assert not sorted(u for u in used if not allowed(rules, *u))


async def test_spec_change_mid_run_leaves_no_running_child_of_the_old_run(
    op: Operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = op.cluster
    real_list = KubeApi.list

    async def list_like_a_server(self: KubeApi, *args: Any, **kw: Any) -> list[dict[str, Any]]:
        """A real API server's list items carry no apiVersion/kind (kmock's do)."""
        return [
            {k: v for k, v in o.items() if k not in ("apiVersion", "kind")}
            for o in await real_list(self, *args, **kw)
        ]

    monkeypatch.setattr(KubeApi, "list", list_like_a_server)
    old = await to_training(op)
    await op.spec_patch({"target": {"revision": "v2"}})
    mid = await op.tick()
    new = await op.run()
    assert mid["status"]["run"]["id"] == new.run_id != old.run_id
    # nothing of the old run is left that could run a pod
    for kind, api, stage in [("Deployment", "apps/v1", "server"), ("Job", "batch/v1", "regenerate"),
                             ("Job", "batch/v1", "merge"), ("PyTorchJob", "kubeflow.org/v1", "train")]:  # fmt: skip
        assert await c.api.get(api, kind, NS, old.child_name(stage)) is None, stage
    assert await c.api.get("apps/v1", "Deployment", NS, new.child_name("server")) is not None
    # the seed stage did not change (same dataset): not re-run, its Job kept
    assert new.child_name("seed") == old.child_name("seed")
    assert await c.api.get("batch/v1", "Job", NS, old.child_name("seed")) is not None
    assert any(e["reason"] == "SupersededChildrenDeleted" for e in events(c))


async def test_stall_scales_the_server_to_zero(op: Operator) -> None:
    c = op.cluster
    run = await op.run()
    await op.tick()
    await finish(c, run, "seed")
    await op.tick()
    await c.set_status("apps/v1", "Deployment", run.child_name("server"), {"readyReplicas": 1})
    await op.tick()
    await finish(c, run, "regenerate", ok=False)  # maxRetries = 1: one retry
    await op.tick()
    await finish(c, run.with_attempts({"regenerate": 1}), "regenerate", ok=False)
    stalled = await op.tick()
    assert stalled["status"]["phase"] == "Stalled"
    assert cond(stalled, "Stalled")["reason"] == "RegenerateFailed"
    dep = await c.api.get("apps/v1", "Deployment", NS, run.child_name("server"))
    assert dep["spec"]["replicas"] == 0
    await c.set_status("apps/v1", "Deployment", run.child_name("server"), {"readyReplicas": 0})  # kubelet

    # a retry request (annotation) grants a new budget: a fresh Job, the server back up
    await op.spec_patch({}, annotations={"deepspec.io/retry": "2026-12-01T09:00"})
    retried = await op.tick()
    assert retried["status"]["phase"] == "StartingServer"
    assert (await c.api.get("apps/v1", "Deployment", NS, run.child_name("server")))["spec"]["replicas"] == 1
    await c.set_status("apps/v1", "Deployment", run.child_name("server"), {"readyReplicas": 1})
    assert (await op.tick())["status"]["phase"] == "Regenerating"
    assert await c.api.get(
        "batch/v1", "Job", NS, run.with_attempts({"regenerate": 2}).child_name("regenerate")
    )


async def test_server_that_never_gets_ready_hits_its_deadline(op: Operator) -> None:
    c = op.cluster
    run = await op.run()
    await op.tick()
    await finish(c, run, "seed")
    assert (await op.tick())["status"]["phase"] == "StartingServer"
    op.clock += dt.timedelta(seconds=3599)
    assert (await op.tick())["status"]["phase"] == "StartingServer"
    op.clock += dt.timedelta(seconds=2)  # past spec.deadlines.serverReadySeconds (3600)
    stalled = await op.tick()
    assert cond(stalled, "Stalled")["reason"] == "ServerDeadlineExceeded"
    assert (await c.api.get("apps/v1", "Deployment", NS, run.child_name("server")))["spec"]["replicas"] == 0


async def test_stage_deadline_deletes_the_pending_job(op: Operator) -> None:
    c = op.cluster
    run = await to_training(op)
    op.clock += dt.timedelta(days=15)  # pods Pending forever: past trainSeconds (14 days)
    stalled = await op.tick()
    assert cond(stalled, "Stalled")["reason"] == "TrainDeadlineExceeded"
    assert await c.api.get("kubeflow.org/v1", "PyTorchJob", NS, run.child_name("train")) is None


async def test_deleted_finished_job_does_not_deadlock(op: Operator) -> None:
    c = op.cluster
    run = await to_training(op)
    before = creates(c)
    for stage in ("seed", "regenerate", "merge"):  # e.g. a ttlSecondsAfterFinished or a cleanup script
        await c.api.delete("batch/v1", "Job", NS, run.child_name(stage))
    restarted = Operator(c, op.name)  # a fresh operator process, no memory
    assert (await restarted.tick(3))["status"]["phase"] == "Training"
    assert creates(c) == before  # neither the server nor regeneration came back
    await restarted.api.close()


async def test_refused_create_is_a_condition_and_an_event(op: Operator) -> None:
    c = op.cluster
    run = await op.run()
    status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
              "message": 'Job.batch "x" is invalid: spec.template.spec.containers[0].image: Required value'}  # fmt: skip
    c.kmock[f"post /apis/batch/v1/namespaces/{NS}/jobs"] << 422 << status
    blocked = await op.tick(1)
    stalled = cond(blocked, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "CreateRejected"
    assert run.child_name("seed") in stalled["message"] and "Required value" in stalled["message"]
    assert cond(blocked, "Ready")["status"] == "False"
    warning = [e for e in events(c) if e["reason"] == "CreateRejected"]
    assert warning and warning[0]["type"] == "Warning" and "HTTP 422" in warning[0]["message"]


async def test_operator_upgrade_adding_defaults_reruns_nothing(op: Operator, example: dict[str, Any]) -> None:
    c = op.cluster
    run = await to_succeeded(op)
    before = creates(c)
    # the new CRD's defaults get written into the stored object (structural defaulting on update)
    stored, rejections = admit(copy.deepcopy(example))
    assert not rejections
    await c.api.patch(*DT, NS, op.name, {"spec": stored["spec"]})
    assert Run.from_body(await c.dt(op.name)).run_id == run.run_id
    after = await op.tick()
    assert after["status"]["phase"] == "Succeeded" and after["status"]["run"]["id"] == run.run_id
    assert creates(c) == before


async def test_gate_change_regates_without_retraining(op: Operator) -> None:
    c = op.cluster
    await op.spec_patch({"evaluation": {"gate": {"minAcceptLength": 3.5}}})
    run = await to_training(op)
    await finish(c, run, "train")
    await op.tick()
    await c.add_eval_pod(run.child_name("evaluate"), SUMMARY)  # 3.1 < 3.5
    await finish(c, run, "evaluate")
    failed = await op.tick()
    assert failed["status"]["phase"] == "GateFailed"
    assert cond(failed, "GatePassed")["status"] == "False" and cond(failed, "Serving")["status"] == "False"
    before = creates(c)
    await op.spec_patch({"evaluation": {"gate": {"minAcceptLength": 3.0}}})
    regated = await op.tick()
    assert regated["status"]["run"]["id"] == run.run_id  # same run: the gate is no stage's input
    assert regated["status"]["phase"] == "Exporting"
    new = {k for k in creates(c) if k not in before}
    assert new == {("jobs", run.child_name("export"))}, new  # no training, no evaluation


async def test_evaluation_change_reevaluates_only(op: Operator) -> None:
    c = op.cluster
    old = await to_succeeded(op)
    before = creates(c)
    await op.spec_patch({"evaluation": {"numProposals": 5}})
    mid = await op.tick()
    new = await op.run()
    assert mid["status"]["phase"] == "Evaluating"
    assert new.child_name("train") == old.child_name("train") and new.child_name(
        "evaluate"
    ) != old.child_name("evaluate")
    created = {k for k in creates(c) if k not in before}
    assert ("jobs", new.child_name("evaluate")) in created
    assert not [k for k in created if k[0] in ("pytorchjobs", "deployments") or "regenerate" in k[1]]
    assert mid["status"]["serving"]["runId"] == old.run_id  # still serving the evaluated draft
    # once the new run serves, a Job prunes the superseded folders (the old evaluation's), keeping
    # every folder the serving run uses (the shared checkpoint included)
    await c.add_eval_pod(new.child_name("evaluate"), SUMMARY)
    await finish(c, new, "evaluate")
    done = await op.tick()
    assert done["status"]["phase"] == "Succeeded" and done["status"]["serving"]["runId"] == new.run_id
    job = await c.api.get("batch/v1", "Job", NS, new.child_name("prune"))
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    keep = cmd[cmd.index("--keep") + 1].split(",")
    assert f"train-{old.ids['train']}" in keep and f"evaluate-{new.ids['evaluate']}" in keep
    assert f"evaluate-{old.ids['evaluate']}" not in keep


async def test_suspend_stops_and_resumes(op: Operator) -> None:
    c = op.cluster
    run = await to_training(op)
    await op.spec_patch({"suspend": True})
    suspended = await op.tick()
    assert suspended["status"]["phase"] == "Suspended"
    assert cond(suspended, "Suspended")["status"] == "True"
    ptj = await c.api.get("kubeflow.org/v1", "PyTorchJob", NS, run.child_name("train"))
    assert ptj["spec"]["runPolicy"]["suspend"] is True
    assert (await c.api.get("apps/v1", "Deployment", NS, run.child_name("server")))["spec"]["replicas"] == 0
    op.clock += dt.timedelta(days=30)  # suspended time does not count against the deadlines
    await op.spec_patch({"suspend": False})
    resumed = await op.tick()
    assert resumed["status"]["phase"] == "Training"
    assert cond(resumed, "Suspended")["status"] == "False"
    ptj = await c.api.get("kubeflow.org/v1", "PyTorchJob", NS, run.child_name("train"))
    assert ptj["spec"]["runPolicy"]["suspend"] is False


async def test_eval_summary_from_the_volume_when_the_pod_is_gone(op: Operator) -> None:
    c = op.cluster
    run = await to_training(op)
    await finish(c, run, "train")
    await op.tick()
    await finish(c, run, "evaluate")  # succeeded, but its pod was evicted/GC'd: no termination message
    reading = await op.tick()
    assert reading["status"]["run"]["children"]["summary"] == run.child_name("summary")
    await c.add_eval_pod(run.child_name("summary"), SUMMARY)
    await finish(c, run, "summary")
    done = await op.tick()
    assert done["status"]["results"]["macroAcceptLength"] == pytest.approx(3.1)
    assert done["status"]["phase"] == "Exporting"


async def test_deleting_the_resource_keeps_the_volume(op: Operator) -> None:
    """Retain (default): the PVC has no owner reference, so the garbage collector keeps it."""
    c = op.cluster
    run = await to_training(op)
    pvc = await c.api.get("v1", "PersistentVolumeClaim", NS, run.pvc_name)
    assert pvc is not None and "ownerReferences" not in pvc["metadata"]
    job = await c.api.get("batch/v1", "Job", NS, run.child_name("merge"))
    assert job["metadata"]["ownerReferences"][0]["uid"]  # the children are collected
    body = await c.dt(op.name)
    body["spec"]["storage"] = {"pvc": {"retentionPolicy": "Delete"}}
    owned = build_pvc(Run.from_body(body))
    assert owned["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]


async def test_larger_volume_expands_the_claim_and_reruns_nothing(op: Operator) -> None:
    c = op.cluster
    run = await to_training(op)
    before = creates(c)
    await op.spec_patch({"storage": {"pvc": {"size": "800Gi"}}})
    after = await op.tick()
    assert after["status"]["run"]["id"] == run.run_id and after["status"]["phase"] == "Training"
    pvc = await c.api.get("v1", "PersistentVolumeClaim", NS, run.pvc_name)
    assert pvc["spec"]["resources"]["requests"]["storage"] == "800Gi"
    assert creates(c) == before  # no second claim, no new run
    assert any(e["reason"] == "VolumeExpanding" for e in events(c))


async def test_fresh_volume_with_relative_paths_runs_to_succeeded(
    op: Operator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed Job's own command, run here on an empty folder standing for the fresh volume."""
    from deepspec.operator import cli, seed

    c = op.cluster
    source = tmp_path / "upstream.jsonl"
    source.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    await op.spec_patch({"dataset": {"source": str(source)}})
    run = await op.run()
    assert (await op.tick())["status"]["phase"] == "Seeding"
    job = await c.api.get("batch/v1", "Job", NS, run.child_name("seed"))
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    volume = tmp_path / "volume"
    volume.mkdir()
    argv = [a.replace("/data/", f"{volume}/") for a in command[2:]]  # deepspec operator seed ...
    fetched: list[list[str]] = []

    def fake_fetch(names: list[str], out: Path, timeout: float, force: bool) -> None:  # no network here
        fetched.append(names)
        out.mkdir(parents=True, exist_ok=True)
        for n in names:
            (out / f"{n}.jsonl").write_text('{"turns": ["q"]}\n')

    monkeypatch.setattr("deepspec.eval.benchmarks_cli.fetch", fake_fetch)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(argv)) == 0, shlex.join(argv)
    assert (volume / "datasets/train/prompts.jsonl").read_text() == source.read_text()
    assert fetched == [["gsm8k"]]
    # without a source the Job fails with a message naming the path and the way out
    with pytest.raises(seed.SeedError, match=r"prompts\.jsonl is not on the run volume"):
        seed.seed(str(tmp_path / "empty/datasets/train/prompts.jsonl"))
    await finish(c, run, "seed")
    await op.tick()
    await c.set_status("apps/v1", "Deployment", run.child_name("server"), {"readyReplicas": 1})
    await op.tick()
    for stage in ("regenerate", "merge", "train"):
        await finish(c, run, stage)
        await op.tick()
    await c.add_eval_pod(run.child_name("evaluate"), SUMMARY)
    await finish(c, run, "evaluate")
    await op.tick()
    await finish(c, run, "export")
    assert (await op.tick())["status"]["phase"] == "Succeeded"
