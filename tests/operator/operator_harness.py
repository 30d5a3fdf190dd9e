"""Helpers of the operator tests: paths, example resources, a kopf operator running against kmock."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from deepspec.operator.builders import Run

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "../shared/k8s-schemas"
EXAMPLES = sorted((REPO / "manifests/examples").glob("*.yaml"))
CHART = REPO / "charts/deepspec-operator"
NS = "ml"
VERBS = {"get", "list", "watch", "create", "patch", "delete"}


def load_example(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "manifests/examples" / name).read_text())


def write_kubeconfig(
    path: Path,
    server: str,
    token: str | None = None,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
) -> Path:
    """A one-context kubeconfig (the format ``kubectl config view`` prints)."""
    user: dict[str, Any] = {}
    if token:
        user["token"] = token
    if cert and key:
        user["client-certificate"], user["client-key"] = str(cert), str(key)
    cluster: dict[str, Any] = {"server": server}
    if ca:
        cluster["certificate-authority"] = str(ca)
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "test", "preferences": {},
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": "operator", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "operator", "namespace": NS}}],
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


class Cluster:
    """kmock + a kopf operator that can be stopped and restarted; helpers to play the kubelet."""

    def __init__(self, kmock: Any) -> None:
        from deepspec.operator.kube import KubeApi

        self.kmock = kmock
        # plays kubelet, controllers & user
        self.api = KubeApi.for_server(str(kmock.url), user_agent="deepspec-tests")
        self.task: asyncio.Task[None] | None = None
        self.stop_flag: asyncio.Event | None = None
        self.metrics: Any = None

    def declare(self, *, pytorchjob: bool = True, podmonitor: bool = True) -> None:
        info = self.kmock.ResourceInfo
        res = self.kmock.resources
        res["deepspec.io/v1alpha1/drafttrainings"] = info(
            kind="DraftTraining", namespaced=True, verbs={"get", "list", "watch", "patch"},
            subresources={"status"}, shortnames={"dt"},
        )  # fmt: skip
        for path, kind in [
            ("v1/pods", "Pod"), ("v1/configmaps", "ConfigMap"), ("v1/services", "Service"),
            ("v1/persistentvolumeclaims", "PersistentVolumeClaim"), ("v1/events", "Event"),
            ("apps/v1/deployments", "Deployment"), ("batch/v1/jobs", "Job"),
            ("v1/namespaces", "Namespace"), ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition"),
        ]:  # fmt: skip
            cluster_scoped = kind in ("Namespace", "CustomResourceDefinition")
            res[path] = info(kind=kind, namespaced=not cluster_scoped, verbs=VERBS)
        if pytorchjob:
            res["kubeflow.org/v1/pytorchjobs"] = info(kind="PyTorchJob", namespaced=True, verbs=VERBS)
        if podmonitor:
            res["monitoring.coreos.com/v1/podmonitors"] = info(
                kind="PodMonitor", namespaced=True, verbs=VERBS
            )

    async def start(self) -> None:
        import kopf

        from deepspec.operator.handlers import build_registry
        from deepspec.operator.kube import KubeApi
        from deepspec.operator.metrics import OperatorMetrics

        # credentials: the operator's own login handler reads $KUBECONFIG (set by the fixture)
        registry = build_registry(interval=0.1, metrics_port=None)
        self.metrics = self.metrics or OperatorMetrics()
        memo = kopf.Memo(api=KubeApi.from_environment(), metrics=self.metrics)
        settings = kopf.OperatorSettings()
        settings.watching.server_timeout = 10
        settings.scanning.disabled = True  # the namespace is given; no namespace/CRD scanning
        self.stop_flag = asyncio.Event()
        self.task = asyncio.create_task(
            kopf.operator(registry=registry, settings=settings, namespaces=[NS], standalone=True,
                          memo=memo, stop_flag=self.stop_flag)
        )  # fmt: skip

    async def stop(self) -> None:
        assert self.task is not None and self.stop_flag is not None
        self.stop_flag.set()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(self.task, 10)
        self.task = None

    # ---- the objects ---------------------------------------------------------------------------

    async def dt(self, name: str) -> dict[str, Any]:
        obj = await self.api.get("deepspec.io/v1alpha1", "DraftTraining", NS, name)
        assert obj is not None
        return obj

    async def wait(self, predicate: Callable[[], Awaitable[Any]], what: str, timeout: float = 20) -> Any:
        """Poll ``predicate`` until truthy (the operator works in the background)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = await predicate()
            if value:
                return value
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    async def wait_child(self, api_version: str, kind: str, name: str) -> dict[str, Any]:
        return await self.wait(lambda: self.api.get(api_version, kind, NS, name), f"{kind} {name}")

    async def wait_phase(self, name: str, phase: str, timeout: float = 20) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            obj = await self.dt(name)
            return obj if (obj.get("status") or {}).get("phase") == phase else None

        return await self.wait(check, f"phase {phase}", timeout)

    async def set_status(self, api_version: str, kind: str, name: str, status: dict[str, Any]) -> None:
        await self.api.patch(api_version, kind, NS, name, {"status": status}, subresource="status")

    async def finish_job(
        self, name: str, ok: bool = True, kind: str = "Job", api_version: str = "batch/v1"
    ) -> None:
        ctype = (
            {"Job": "Complete", "PyTorchJob": "Succeeded", "TrainJob": "Complete"}[kind] if ok else "Failed"
        )
        await self.set_status(api_version, kind, name, {
            "conditions": [{"type": ctype, "status": "True", "reason": "Test", "message": "BackoffLimitExceeded" if not ok else "done"}],
        })  # fmt: skip

    async def add_eval_pod(self, job: str, summary: dict[str, Any]) -> None:
        import json

        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{job}-abcde", "namespace": NS, "labels": {"job-name": job}},
            "spec": {"containers": [{"name": "evaluate", "image": "x"}]},
            "status": {"containerStatuses": [{"name": "evaluate", "state": {"terminated": {"exitCode": 0, "message": json.dumps(summary)}}}]},
        }  # fmt: skip
        await self.api.create(pod)


def deep(obj: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(obj)


def operator_permissions(kmock: Any) -> set[tuple[str, str, str]]:
    """(verb, apiGroup, resource[/subresource]) of every request kopf or the operator's client made."""
    used: set[tuple[str, str, str]] = set()
    for r in list(kmock):
        agent = r.headers.get("User-Agent", "")
        if (
            r.resource is None
            or r.resource.plural is None
            or not agent.startswith(("kopf/", "deepspec-operator"))
        ):
            continue
        method = r.method.value
        if method == "GET":
            verb = "get" if r.name else ("watch" if r.params.get("watch") in ("true", "1") else "list")
        else:
            verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]
        resource = r.resource.plural + (f"/{r.subresource}" if r.subresource else "")
        used.add((verb, r.resource.group or "", resource))
    return used


def rbac_rules(values: dict[str, Any] | None = None, kind: str = "ClusterRole") -> list[dict[str, Any]]:
    """The operator's rules in the chart: the ClusterRole (cluster-wide install) or the Role of the
    first watched namespace (namespaced install, ``watchNamespaces`` set)."""
    from helm_python.chart import Chart

    out = Chart.load(str(CHART)).render(values or {}, name="ds", namespace="ops")
    docs = [d for d in yaml.safe_load_all(out["deepspec-operator/templates/rbac.yaml"]) if d]
    role = next(d for d in docs if d["kind"] == kind)
    return role["rules"]


def clusterrole_rules(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return rbac_rules(values, "ClusterRole")


def allowed(rules: list[dict[str, Any]], verb: str, group: str, resource: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


SUMMARY = {
    "v": 1, "algorithm": "dspark", "target_revision": "main", "checkpoint": "/data/x/draft/step_100",
    "macro_accept_length": 3.1,
    "benchmarks": {"gsm8k": {"tau": 3.2, "acceptance_ratio": 0.31, "n": 500}},
}  # fmt: skip


def creates(cluster: Cluster) -> Counter[tuple[str, str]]:
    """(resource plural, object name) -> number of create requests, events excluded."""
    out: Counter[tuple[str, str]] = Counter()
    for r in list(cluster.kmock):
        if r.method.value == "POST" and r.resource is not None and r.resource.plural != "events":
            out[(r.resource.plural, (r.data or {}).get("metadata", {}).get("name"))] += 1
    return out


async def drive_to_success(
    cluster: Cluster,
    run: Run,
    summary: dict[str, Any],
    before_stage: Callable[[str], Awaitable[None]] | None = None,
    serving_on_new_target: dict[str, Any] | None = None,
) -> None:
    """Walk every stage of ``run`` while the operator reacts in the background.

    ``before_stage(stage)`` runs once the stage's child exists, before it is marked finished.
    ``serving_on_new_target``: the summary of the serving draft's re-evaluation Job (a run after a
    target update, while another draft serves).
    """
    from deepspec.operator.builders import needs_seed

    if needs_seed(run):
        await cluster.wait_child("batch/v1", "Job", run.child_name("seed"))
        await cluster.finish_job(run.child_name("seed"))
    server = run.child_name("server")
    await cluster.wait_child("apps/v1", "Deployment", server)
    await cluster.wait_child("v1", "Service", server)
    await cluster.set_status("apps/v1", "Deployment", server, {"readyReplicas": 1, "replicas": 1})
    for stage, kind, api_version in [
        ("regenerate", "Job", "batch/v1"),
        ("merge", "Job", "batch/v1"),
        ("train", "PyTorchJob", "kubeflow.org/v1"),
        ("evaluate", "Job", "batch/v1"),
        ("export", "Job", "batch/v1"),
    ]:
        name = run.child_name(stage)
        await cluster.wait_child(api_version, kind, name)
        if before_stage is not None:
            await before_stage(stage)
        if stage == "evaluate":
            await cluster.add_eval_pod(name, summary)
        await cluster.finish_job(name, kind=kind, api_version=api_version)
        if stage == "evaluate" and serving_on_new_target is not None:
            reeval = await cluster.wait(
                lambda: _child_with_prefix(cluster, f"{run.name}-reeval-"), "reeval Job"
            )
            await cluster.add_eval_pod(reeval, serving_on_new_target)
            await cluster.finish_job(reeval)
        if stage == "regenerate":
            dep = await cluster.wait(
                lambda: _scaled_to_zero(cluster, server), "server scaled to zero after regeneration"
            )
            assert dep["spec"]["replicas"] == 0


async def _scaled_to_zero(cluster: Cluster, name: str) -> dict[str, Any] | None:
    dep = await cluster.api.get("apps/v1", "Deployment", NS, name)
    return dep if dep and dep["spec"]["replicas"] == 0 else None


async def _child_with_prefix(cluster: Cluster, prefix: str) -> str | None:
    jobs = await cluster.api.list("batch/v1", "Job", NS)
    return next((j["metadata"]["name"] for j in jobs if j["metadata"]["name"].startswith(prefix)), None)
