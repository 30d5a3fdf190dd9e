"""Issue 14, acceptance 3: the monitored retrain loop against kmock (a Kubernetes API mock).

The reconciler is driven pass by pass (as in test_scenarios.py). The live monitor is the real one:
its Deployment's command line is parsed by ``deepspec monitor``'s own argument parser, and a
:class:`deepspec.monitor.service.Monitor` built from it (stub acceptance source, test clock) produces
the ``/metrics`` text the operator reads. The publish Job's command runs through the real CLI on a
local folder standing for the run volume.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import shlex
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from operator_harness import NS, SUMMARY, Cluster, allowed, operator_permissions, rbac_rules
from prometheus_client import CollectorRegistry, generate_latest
from test_scenarios import Operator, cond, events, finish, to_training

from deepspec.cli import main as deepspec_main
from deepspec.monitor import cli as monitor_cli
from deepspec.monitor.drift import Baseline, DriftPolicy
from deepspec.monitor.publish import read_current
from deepspec.monitor.scrape import Measurement
from deepspec.monitor.service import Monitor, MonitorCollector, MonitorLabels
from deepspec.monitor.window import AcceptanceSample
from deepspec.operator import builders as b
from deepspec.operator.builders import Run
from deepspec.operator.reconcile import apply_outcome, reconcile
from deepspec.operator.spec import DraftTrainingSpec

pytestmark = pytest.mark.asyncio
SERVING = "sglang-qwen3"
SERVING_ARGS = ["--model-path", "Qwen/Qwen3-8B", "--speculative-algorithm", "EAGLE3",
                "--speculative-draft-model-path", "/models/draft-v0"]  # fmt: skip


class LiveServing:
    """Plays the serving stack + the deployed monitor: live accepted length set by the test."""

    def __init__(self, cluster: Cluster, clock: Any) -> None:
        self.cluster = cluster
        self.clock = clock
        self.accept_length = 3.0
        self.monitor: Monitor | None = None
        self.command: list[str] | None = None
        self.urls: list[str] = []

    async def read(self, url: str) -> str | None:
        """What GET ``url`` (the monitor Service) answers: the monitor running the Deployment's command."""
        self.urls.append(url)
        name = url.split("//", 1)[1].split(".", 1)[0]
        dep = await self.cluster.api.get("apps/v1", "Deployment", NS, name)
        if dep is None:
            return None
        command = dep["spec"]["template"]["spec"]["containers"][0]["command"]
        if command != self.command:  # a new pod: the real CLI parses the command line
            assert command[:2] == ["deepspec", "monitor"]
            parser = argparse.ArgumentParser()
            monitor_cli.add_arguments(parser)
            args = parser.parse_args(command[2:])
            policy = DriftPolicy(args.tolerance, args.duration, args.min_verify_steps, args.broken_below)
            labels = MonitorLabels(args.served_model, args.draft_version, args.engine, args.mode)
            base = Baseline(args.baseline, args.draft_version) if args.baseline is not None else None
            self.monitor = Monitor(self, labels, policy, args.window, base, clock=self.seconds)
            self.command = command
        assert self.monitor is not None
        self.monitor.tick()
        registry = CollectorRegistry()
        registry.register(MonitorCollector(self.monitor))
        return generate_latest(registry).decode()

    def seconds(self) -> float:
        return self.clock().timestamp()

    def collect(self) -> Measurement:  # the monitor's Source: 1000 verification steps a measurement
        return Measurement(AcceptanceSample(1000.0, 1000.0 * (self.accept_length - 1.0)), speculating=True)


class MonitoredOperator(Operator):
    def __init__(self, cluster: Cluster, name: str) -> None:
        super().__init__(cluster, name)
        self.live = LiveServing(cluster, lambda: self.clock)

    async def tick(self, times: int = 1) -> dict[str, Any]:  # one pass: kmock's log scan is O(requests)
        for _ in range(times):
            body = await self.cluster.dt(self.name)
            out = await reconcile(self.api, body, now=self.now, read_metrics=self.live.read)
            await apply_outcome(self.api, body, out)
        return await self.cluster.dt(self.name)


def monitored(example: dict[str, Any], policy: str) -> dict[str, Any]:
    body = copy.deepcopy(example)
    body["spec"]["monitoring"] = {
        "mode": "scrape", "engine": "sglang", "servedModel": "qwen3-8b",
        "metricsUrls": [f"http://{SERVING}.{NS}.svc:30000/metrics"],
        "durationSeconds": 600, "windowSeconds": 300, "intervalSeconds": 30, "minVerifySteps": 100,
    }  # fmt: skip
    body["spec"]["retrain"] = {"policy": policy}
    body["spec"]["publish"] = {"servingRef": {"name": SERVING}}
    return body


async def start(cluster: Cluster, example: dict[str, Any], policy: str) -> MonitoredOperator:
    await cluster.api.create({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": SERVING, "namespace": NS},
        "spec": {"selector": {"matchLabels": {"app": SERVING}}, "template": {
            "metadata": {"labels": {"app": SERVING}},
            "spec": {"containers": [{"name": "sglang", "image": "lmsysorg/sglang:v0.5.4-cu126",
                                     "command": ["python3", "-m", "sglang.launch_server"], "args": SERVING_ARGS}]}}},
    })  # fmt: skip
    await cluster.api.create(monitored(example, policy))
    STARTED.append(MonitoredOperator(cluster, example["metadata"]["name"]))
    return STARTED[-1]


@pytest_asyncio.fixture
async def volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Path]:
    """A local folder standing for the run volume; closes the operators' API clients afterwards."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path / "data"
    for op in STARTED:
        await op.api.close()
    STARTED.clear()


STARTED: list[MonitoredOperator] = []


async def run_publish_job(cluster: Cluster, run: Run, volume: Path) -> str:
    """Execute the publish Job's command with the real CLI, /data being ``volume``."""
    job = await cluster.api.get("batch/v1", "Job", NS, run.child_name("publish"))
    assert job is not None
    command = [
        w.replace("/data", str(volume)) for w in job["spec"]["template"]["spec"]["containers"][0]["command"]
    ]
    export_dir = Path(command[3])
    export_dir.mkdir(parents=True, exist_ok=True)
    (export_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLMEagle3"]}')
    (export_dir / "model.safetensors").write_bytes(run.run_id.encode())
    assert command[:3] == ["deepspec", "operator", "publish"], shlex.join(command)
    assert deepspec_main(command[1:]) == 0
    await finish(cluster, run, "publish")
    return command[4]


async def first_run(op: MonitoredOperator, volume: Path) -> Run:
    """The first draft (3.1 on revision "main"): gated, exported, published, serving."""
    c = op.cluster
    run = await to_training(op)
    await finish(c, run, "train")
    await op.tick()
    await c.add_eval_pod(run.child_name("evaluate"), SUMMARY)
    await finish(c, run, "evaluate")
    await op.tick()
    await finish(c, run, "export")
    assert (await op.tick())["status"]["phase"] == "Publishing"
    await run_publish_job(c, run, volume)
    served = await op.tick()
    assert served["status"]["phase"] == "Succeeded"
    assert served["status"]["serving"]["runId"] == run.run_id
    return run


async def walk_retrain(
    op: MonitoredOperator, candidate: float, serving_on_new_target: float, volume: Path
) -> tuple[Run, dict[str, Any]]:
    """A run started by a target update, up to the promotion decision (and publication if promoted)."""
    c = op.cluster
    run = current_run(await c.dt(op.name))
    assert (await op.tick())["status"]["phase"] == "StartingServer"
    await c.set_status("apps/v1", "Deployment", run.child_name("server"), {"readyReplicas": 1})
    await op.tick()
    await finish(c, run, "regenerate")
    await op.tick()
    await finish(c, run, "merge")
    await op.tick()
    await finish(c, run, "train")
    await op.tick()
    await c.add_eval_pod(run.child_name("evaluate"), {**SUMMARY, "macro_accept_length": candidate})
    await finish(c, run, "evaluate")
    reevaluating = await op.tick()
    reeval = reevaluating["status"]["run"]["children"]["reeval"]
    job = await c.api.get("batch/v1", "Job", NS, reeval)
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    serving_ckpt = (await c.dt(op.name))["status"]["serving"]["checkpoint"]
    assert cmd[cmd.index("--checkpoint") + 1] == serving_ckpt  # the serving draft, on the new target's recipe
    await c.add_eval_pod(reeval, {**SUMMARY, "macro_accept_length": serving_on_new_target})
    await c.finish_job(reeval)
    decided = await op.tick()
    if decided["status"]["phase"] == "GateFailed":
        return run, decided
    await finish(c, run, "export")
    await op.tick()
    await run_publish_job(c, run, volume)
    return run, await op.tick()


def current_run(body: dict[str, Any]) -> Run:
    """The run the operator works on (a drift-triggered retrain's nonce included)."""
    spec = DraftTrainingSpec.model_validate(body["spec"])
    nonce = (body.get("status") or {}).get("retrainNonce")
    meta = body["metadata"]
    return Run(meta["name"], meta["namespace"], meta["uid"], spec, b.run_id_of(spec, nonce),
               training_backend="pytorchjob", ids=b.stage_ids(spec, nonce))  # fmt: skip


async def bump(op: MonitoredOperator, revision: str) -> None:
    await op.spec_patch({"target": {"revision": revision}})


async def serving_args(cluster: Cluster) -> list[str]:
    dep = await cluster.api.get("apps/v1", "Deployment", NS, SERVING)
    return dep["spec"]["template"]["spec"]["containers"][0]["args"]


async def test_on_target_update_promotes_only_a_draft_that_wins_on_the_new_target(
    cluster: Cluster, example: dict[str, Any], volume: Path
) -> None:
    op = await start(cluster, example, "onTargetUpdate")
    first = await first_run(op, volume)
    served = await op.tick()
    # the monitor watches the serving draft with its gate figure as baseline
    monitor = await cluster.api.get("apps/v1", "Deployment", NS, b.monitor_name(first))
    command = monitor["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--draft-version") + 1] == first.run_id
    assert command[command.index("--baseline") + 1] == "3.1"
    assert served["status"]["drift"]["state"] == "ok" and served["status"]["drift"]["baseline"] == 3.1
    args1 = await serving_args(cluster)
    published1 = f"{b.publish_dest(first)}/versions/{b.publish_version(first)}"
    assert args1[args1.index("--speculative-draft-model-path") + 1] == published1

    # revision bump: a new run; its draft (2.8) loses to the serving draft re-evaluated on v2 (3.0)
    await bump(op, "v2")
    lost_run, lost = await walk_retrain(op, candidate=2.8, serving_on_new_target=3.0, volume=volume)
    assert lost_run.run_id != first.run_id
    st = lost["status"]
    assert st["phase"] == "GateFailed"
    assert cond(lost, "GatePassed")["reason"] == "NotBetterThanServing"
    assert st["serving"]["runId"] == first.run_id  # the old draft stays
    assert st["promotion"] == {
        "runId": lost_run.run_id, "promoted": False, "candidateAcceptLength": 2.8, "servingAcceptLength": 3.0,
        "reason": st["promotion"]["reason"],
    }  # fmt: skip
    assert "does not beat the serving draft 3.000" in st["promotion"]["reason"]
    assert await serving_args(cluster) == args1  # serving untouched
    assert await cluster.api.get("batch/v1", "Job", NS, lost_run.child_name("publish")) is None
    not_promoted = [e for e in events(cluster) if e["reason"] == "NotPromoted"]
    assert len(not_promoted) == 1 and "keeping the serving one" in not_promoted[0]["message"]
    await op.tick()  # level-based: the decision is not posted again
    assert len([e for e in events(cluster) if e["reason"] == "NotPromoted"]) == 1

    # the next revision: this draft (3.3) beats the serving one on v3 (2.9): promoted end to end
    await bump(op, "v3")
    won_run, won = await walk_retrain(op, candidate=3.3, serving_on_new_target=2.9, volume=volume)
    st = won["status"]
    assert st["phase"] == "Succeeded", st.get("message")
    assert st["serving"]["runId"] == won_run.run_id and st["serving"]["targetRevision"] == "v3"
    assert st["promotion"]["promoted"] is True and st["promotion"]["servingAcceptLength"] == 2.9
    # published: an immutable version + the current pointer on the volume
    dest = str(volume / b.publish_dest(won_run).removeprefix("/data/"))
    current = read_current(dest)
    assert current is not None and current["version"] == b.publish_version(won_run)
    assert current["previous"] == b.publish_version(first)
    assert (Path(dest) / "current" / "model.safetensors").read_bytes() == won_run.run_id.encode()
    assert st["publication"]["uri"] == f"{b.publish_dest(won_run)}/versions/{b.publish_version(won_run)}"
    # the serving resource now points at the new version (a new path: the Deployment rolls out)
    args2 = await serving_args(cluster)
    assert args2[args2.index("--speculative-draft-model-path") + 1] == st["publication"]["uri"]
    assert args2[:4] == SERVING_ARGS[:4]
    # the live baseline was reset to the new draft's accepted length, and the monitor follows it
    monitor = await cluster.api.get("apps/v1", "Deployment", NS, b.monitor_name(won_run))
    command = monitor["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--baseline") + 1] == "3.3"
    assert command[command.index("--draft-version") + 1] == won_run.run_id
    assert st["drift"]["baseline"] == 3.3
    after = await op.tick()
    assert after["status"]["drift"]["draftVersion"] == won_run.run_id
    assert after["status"]["drift"]["baseline"] == 3.3
    reasons = [e["reason"] for e in events(cluster)]
    for reason in ("ServingReevaluated", "NotPromoted", "Promoted", "ServingUpdated", "BaselineReset"):
        assert reason in reasons, reason
    # every request of the loop (monitor children, serving Deployment patch...) is granted by both roles
    used = operator_permissions(cluster.kmock)
    assert ("patch", "apps", "deployments") in used and (
        "create",
        "monitoring.coreos.com",
        "podmonitors",
    ) in used
    for rules in (rbac_rules(), rbac_rules({"watchNamespaces": [NS]}, "Role")):
        assert not sorted(u for u in used if not allowed(rules, *u))


async def test_on_drift_retrains_on_live_drift(
    cluster: Cluster, example: dict[str, Any], volume: Path
) -> None:
    op = await start(cluster, example, "onDrift")
    first = await first_run(op, volume)
    assert (await op.tick())["status"]["drift"]["state"] == "ok"
    # live acceptance drops (the target changed behind an unchanged revision): drift after 10 min
    op.live.accept_length = 2.2
    op.clock += dt.timedelta(minutes=6)  # the 5-minute window now holds only the low values
    below = await op.tick(1)
    assert below["status"]["drift"]["state"] == "below_baseline"
    op.clock += dt.timedelta(minutes=5)
    below = await op.tick(1)
    assert below["status"]["drift"]["state"] == "below_baseline"
    assert below["status"]["run"]["id"] == first.run_id  # not yet: the drop must last 10 minutes
    op.clock += dt.timedelta(minutes=6)
    drifted = await op.tick(1)
    assert drifted["status"]["drift"]["drift"] is True and drifted["status"]["drift"]["since"]
    assert drifted["status"]["run"]["id"] != first.run_id  # a new run on the same revision
    assert drifted["status"]["retrainNonce"]
    assert drifted["status"]["serving"]["runId"] == first.run_id  # serving until a better draft passes
    assert {"LiveDrift", "RetrainOnDrift"} <= {e["reason"] for e in events(cluster)}
    # the new run re-evaluates the serving draft before any promotion (same revision, new target)
    _, decided = await walk_retrain(op, candidate=3.0, serving_on_new_target=2.3, volume=volume)
    assert decided["status"]["phase"] == "Succeeded"
    assert decided["status"]["promotion"]["promoted"] is True


async def test_manual_policy_waits_for_the_retrain_annotation(
    cluster: Cluster, example: dict[str, Any], volume: Path
) -> None:
    op = await start(cluster, example, "manual")
    first = await first_run(op, volume)
    await bump(op, "v2")
    held = await op.tick()
    assert held["status"]["run"]["id"] == first.run_id and held["status"]["phase"] == "Succeeded"
    assert cond(held, "RetrainRequired")["status"] == "True"
    assert "deepspec.io/retrain" in cond(held, "RetrainRequired")["message"]
    assert [e["reason"] for e in events(cluster)].count("RetrainRequired") == 1
    await bump(op, "main")  # reverted in Git: nothing waits any more
    reverted = await op.tick()
    assert "RetrainRequired" not in {c["type"] for c in reverted["status"]["conditions"]}
    await bump(op, "v2")
    assert cond(await op.tick(), "RetrainRequired")["status"] == "True"
    await op.spec_patch({}, annotations={"deepspec.io/retrain": "1"})
    started = await op.tick()
    assert started["status"]["run"]["id"] != first.run_id
    assert started["status"]["phase"] == "StartingServer"
