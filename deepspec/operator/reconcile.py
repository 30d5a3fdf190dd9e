"""Level-based reconciliation of one ``DraftTraining``.

:func:`reconcile` looks at the spec, the previous status and the children that exist, creates what
is missing for the current stage, and returns the new status plus the Events to post. It is called
periodically; calling it twice in a row changes nothing the second time, and a fresh operator process
picks up exactly where the previous one stopped (children are found by their deterministic names,
creation is idempotent, finished stages are recorded in ``status.run.completed``).

Stages of a run: storage -> [seed] -> SGLang server -> regenerate (Indexed Job) -> server scaled to
zero -> merge -> [features] -> train (PyTorchJob | TrainJob) -> evaluate -> gate -> [export] ->
Succeeded. Each stage has its own id (:func:`deepspec.operator.builders.stage_ids`): when the spec
changes, only the stages whose id changed run again; the gate is applied here on every pass, so a
gate change re-gates without a new Job.

Failure handling, the way Kubeflow's and cert-manager's controllers do it:

* a failed stage is re-created with ``-r<N>`` up to ``spec.maxRetries`` times, then the resource is
  ``Stalled``; annotating it with ``deepspec.io/retry=<any new value>`` grants a new retry budget;
* every stage has a deadline (``spec.deadlines``; the server's covers "never ready", a Job's covers
  pods Pending forever): past it the child is deleted and the resource is ``Stalled``;
* a create the API server refuses (403 quota/RBAC/webhook, 422 invalid) sets ``Stalled=True`` with the
  server's message and posts a Warning Event; the create is tried again on the next pass;
* children of superseded runs are deleted (their GPUs freed) and a stall scales the server to zero;
* ``spec.suspend`` suspends the running Jobs (their pods go away) and scales the server to zero;
  clearing it resumes them.

``status.serving`` keeps the previous draft until a new one passes the gate; the ``Serving`` condition
says whether a good draft is being served, independently of ``Ready`` (the current run's state).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from deepspec.eval.summary import EvalSummary, gate_decision
from deepspec.monitor.lifecycle import promotion_decision, should_retrain
from deepspec.operator import builders as b
from deepspec.operator.kube import KubeApi, KubeError
from deepspec.operator.live import MetricsReader, http_metrics, parse_monitor_metrics
from deepspec.operator.spec import (
    RETRAIN_ANNOTATION,
    RETRY_ANNOTATION,
    Condition,
    DraftTrainingSpec,
    DraftTrainingStatus,
    Drift,
    Promotion,
    Publication,
    Results,
    RunStatus,
    Serving,
)

#: Phases in which nothing runs until the spec changes (or a retry is requested, for Stalled).
IDLE = ("Succeeded", "Stalled", "Suspended")
STAGE_CONDITIONS = {
    "storage": "StorageReady",
    "seed": "Seeded",
    "server": "ServerReady",
    "regenerate": "Regenerated",
    "merge": "Merged",
    "features": "FeaturesCached",
    "train": "Trained",
    "evaluate": "Evaluated",
    "summary": "Evaluated",
    "reeval": "ServingReevaluated",
    "gate": "GatePassed",
    "export": "Exported",
    "publish": "Published",
}
STAGE_PHASES = {
    "seed": "Seeding",
    "regenerate": "Regenerating",
    "merge": "Merging",
    "features": "CachingFeatures",
    "train": "Training",
    "evaluate": "Evaluating",
    "summary": "Evaluating",
    "reeval": "Evaluating",
    "export": "Exporting",
    "publish": "Publishing",
}
KEPT_CONDITIONS = ("Ready", "Reconciling", "Stalled", "Serving", "Suspended")
#: (apiVersion, kind) of children that may run pods, in deletion order.
WORKLOAD_KINDS = (
    ("apps/v1", "Deployment"),
    ("batch/v1", "Job"),
    ("kubeflow.org/v1", "PyTorchJob"),
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"),
)
OTHER_KINDS = (("v1", "Service"), ("monitoring.coreos.com/v1", "PodMonitor"), ("v1", "ConfigMap"))


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str) -> dt.datetime:
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


@dataclass
class Outcome:
    """What one reconcile decided: the new status and the Events to post (type, reason, message)."""

    status: DraftTrainingStatus
    events: list[tuple[str, str, str]] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


class _Stop(Exception):
    """Internal: the current stage is in progress (or the run is stalled); stop this pass."""


def job_state(obj: dict[str, Any]) -> tuple[str, str]:
    """(Running | Succeeded | Failed, message) of a Job, PyTorchJob or TrainJob."""
    status = obj.get("status") or {}
    for c in status.get("conditions") or []:
        if c.get("status") != "True":
            continue
        if c.get("type") in ("Complete", "Succeeded"):
            return "Succeeded", c.get("message", "")
        if c.get("type") == "Failed":
            return "Failed", c.get("message") or c.get("reason") or "failed"
    completions = (obj.get("spec") or {}).get("completions")
    if obj.get("kind") == "Job" and completions and (status.get("succeeded") or 0) >= completions:
        return "Succeeded", ""
    return "Running", ""


def parse_termination_message(pods: list[dict[str, Any]]) -> EvalSummary | None:
    """The evaluation summary from the first terminated container with a message."""
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or {}
            if term.get("exitCode") == 0 and term.get("message"):
                return EvalSummary.parse(term["message"])
    return None


def _configmaps_referenced(obj: Any) -> set[str]:
    """Names of the ConfigMaps a child's pod templates mount."""
    found: set[str] = set()
    if isinstance(obj, dict):
        cm = obj.get("configMap")
        if isinstance(cm, dict) and cm.get("name"):
            found.add(cm["name"])
        for v in obj.values():
            found |= _configmaps_referenced(v)
    elif isinstance(obj, list):
        for v in obj:
            found |= _configmaps_referenced(v)
    return found


class Reconciler:
    """One pass over one resource. Construct, then ``await run_pass()``."""

    def __init__(
        self,
        api: KubeApi,
        body: dict[str, Any],
        now: Callable[[], str] = now_iso,
        read_metrics: MetricsReader = http_metrics,
    ) -> None:
        self.api = api
        self.read_metrics = read_metrics
        self.body = body
        self.now = now
        self.meta = body["metadata"]
        self.generation = self.meta.get("generation")
        try:
            self.status = DraftTrainingStatus.model_validate(body.get("status") or {})
        except ValidationError:
            self.status = DraftTrainingStatus()
        self.old_phase = self.status.phase
        self.old_conditions = {c.type: (c.status, c.message) for c in self.status.conditions}
        self.out = Outcome(self.status)
        self.blocked: tuple[str, str] | None = None  # (reason, message) of a refused create
        self.run: b.Run | None = None

    # ---- status helpers ----------------------------------------------------------------------------

    def condition(self, type_: str, status: bool | None, reason: str, message: str = "") -> None:
        value = "Unknown" if status is None else ("True" if status else "False")
        for c in self.status.conditions:
            if c.type == type_:
                if c.status != value:
                    c.lastTransitionTime = self.now()
                c.status, c.reason, c.message, c.observedGeneration = value, reason, message, self.generation
                return
        self.status.conditions.append(
            Condition(type=type_, status=value, reason=reason, message=message,
                      lastTransitionTime=self.now(), observedGeneration=self.generation)
        )  # fmt: skip

    def set_phase(self, phase: str, message: str = "") -> None:
        self.status.phase = phase
        self.status.message = message or None

    async def stall(self, reason: str, message: str) -> None:
        """Stalled: nothing more runs until the spec changes or a retry is requested; no GPU stays held."""
        self.set_phase("Stalled", message)
        self.condition("Stalled", True, reason, message)
        if self.run is not None:
            await self.scale_server_to_zero("stalled")
        raise _Stop

    def finish(self) -> Outcome:
        s = self.status
        s.observedGeneration = self.generation
        idle = s.phase in (*IDLE, "GateFailed")
        if self.blocked is not None:
            reason, message = self.blocked
            self.condition("Stalled", True, reason, message)
            if self.old_conditions.get("Stalled") != ("True", message):
                self.out.events.append(("Warning", reason, message))
        elif s.phase == "GateFailed":  # kstatus (Flux) reads Stalled=True as Failed, not as healthy
            self.condition("Stalled", True, "GateFailed", s.message or "")
        elif s.phase != "Stalled":
            self.condition("Stalled", False, "Progressing" if not idle else s.phase or "Pending")
        self.condition(
            "Reconciling", not idle and self.blocked is None, s.phase or "Pending", s.message or ""
        )
        self.condition("Ready", s.phase == "Succeeded", s.phase or "Pending", s.message or "")
        if s.serving.runId:
            self.condition(
                "Serving", True, "DraftServing",
                f"run {s.serving.runId}, accepted length {s.serving.macroAcceptLength}",
            )  # fmt: skip
        else:
            self.condition("Serving", False, "NoDraftYet", "no draft has passed the gate yet")
        if s.phase != self.old_phase:
            kind = "Warning" if s.phase in ("Stalled", "GateFailed") else "Normal"
            self.out.events.append((kind, s.phase or "Pending", s.message or f"phase {s.phase}"))
        return self.out

    def seconds_since(self, stamp: str | None) -> float:
        if not stamp:
            return 0.0
        return (_parse_time(self.now()) - _parse_time(stamp)).total_seconds()

    # ---- child helpers -----------------------------------------------------------------------------

    async def ensure(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The live object, created from ``obj`` when absent (idempotent).

        A refused create (403, 422, 400) blocks the pass: ``Stalled=True`` with the server's message
        and a Warning Event; the next pass tries again (quota freed, webhook fixed, operator upgraded).
        """
        meta = obj["metadata"]
        live = await self.api.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        if live is None:
            try:
                live, created = await self.api.create(obj)
            except KubeError as e:
                if e.status not in (400, 403, 404, 422):
                    raise
                reason = "CreateForbidden" if e.status == 403 else "CreateRejected"
                self.blocked = (
                    reason,
                    f"{obj['kind']} {meta['name']}: the API server refused the create (HTTP {e.status}): "
                    f"{e.detail}",
                )
                raise _Stop from e
            if created:
                self.out.created.append(f"{obj['kind']}/{meta['name']}")
        return live

    def started(self, stage: str) -> str:
        """When the current attempt of ``stage`` started (recorded on first sight)."""
        return self.status.run.stageStartedAt.setdefault(stage, self.now())

    async def check_deadline(self, stage: str, obj: dict[str, Any] | None) -> None:
        limit = self.spec.deadlines.of(
            {"summary": "evaluate", "reeval": "evaluate", "publish": "export"}.get(stage, stage)
        )
        elapsed = self.seconds_since(self.started(stage))
        if elapsed <= limit:
            return
        if obj is not None:
            meta = obj["metadata"]
            if obj["kind"] == "Deployment":
                await self.scale_server_to_zero("deadline")
            else:
                await self.api.delete(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
                self.out.deleted.append(f"{obj['kind']}/{meta['name']}")
        cond = STAGE_CONDITIONS[stage]
        message = f"{stage} did not finish within {limit} s (spec.deadlines)"
        self.condition(cond, False, "DeadlineExceeded", message)
        await self.stall(f"{stage.capitalize()}DeadlineExceeded", message)

    async def job_stage(self, stage: str, build: Callable[[b.Run], dict[str, Any]]) -> None:
        """Drive one Job-like stage; returns when it succeeded, raises _Stop otherwise."""
        cond = STAGE_CONDITIONS[stage]
        run_status = self.status.run
        if run_status.completed.get(stage) == self.run.stage_id(stage):
            self.condition(cond, True, "Succeeded", run_status.children.get(stage, ""))
            return
        while True:
            obj = build(self.run)
            live = await self.ensure(obj)
            run_status.children[stage] = obj["metadata"]["name"]
            state, message = job_state(live)
            if state == "Succeeded":
                self.condition(cond, True, "Succeeded", obj["metadata"]["name"])
                run_status.completed[stage] = self.run.stage_id(stage)
                run_status.stageStartedAt.pop(stage, None)
                return
            if state == "Running":
                self.condition(cond, False, "InProgress", obj["metadata"]["name"])
                self.set_phase(STAGE_PHASES[stage])
                await self.check_deadline(stage, live)
                raise _Stop
            attempt = run_status.attempts.get(stage, 0)
            if attempt - run_status.retryBudgetFrom.get(stage, 0) >= self.spec.maxRetries:
                self.condition(cond, False, "Failed", message)
                await self.stall(
                    f"{stage.capitalize()}Failed",
                    f"{obj['kind']} {obj['metadata']['name']} failed after {attempt + 1} attempt(s): {message}",
                )
            run_status.attempts[stage] = attempt + 1
            run_status.stageStartedAt.pop(stage, None)
            self.run = self.run.with_attempts(run_status.attempts)
            self.out.events.append(
                ("Warning", "Retrying", f"{stage} failed ({message}); attempt {attempt + 2}")
            )

    # ---- the pass ----------------------------------------------------------------------------------

    async def run_pass(self) -> Outcome:
        with contextlib.suppress(_Stop):
            await self._run()
        return self.finish()

    def _start_run(self, run_id: str, ids: dict[str, str]) -> None:
        """A new run: stages whose id did not change keep their results (and children)."""
        st = self.status
        old = st.run
        same = {k for k, v in ids.items() if old.stageIds.get(k) == v}
        if old.id is not None:
            rerun = [k for k in b.STAGES if k not in same]
            self.out.events.append(
                ("Normal", "NewRun", f"spec changed: run {old.id} -> {run_id}; re-running {', '.join(rerun)}")
            )
        st.run = RunStatus(
            id=run_id,
            targetRevision=self.spec.target.revision,
            startedAt=self.now(),
            stageIds=ids,
            attempts={k: v for k, v in old.attempts.items() if k in same},
            retryBudgetFrom={k: v for k, v in old.retryBudgetFrom.items() if k in same},
            children={k: v for k, v in old.children.items() if k in same},
            completed={k: v for k, v in old.completed.items() if k in same},
            retryRequest=old.retryRequest,
            trainingBackend=old.trainingBackend if self.spec.training.backend == "auto" else None,
        )
        st.conditions = [c for c in st.conditions if c.type in KEPT_CONDITIONS]
        self.set_phase("Pending")

    def _handle_retry_request(self) -> bool:
        """A new ``deepspec.io/retry`` annotation value: a fresh retry budget for every stage."""
        st = self.status.run
        value = (self.meta.get("annotations") or {}).get(RETRY_ANNOTATION)
        if not value or value == st.retryRequest:
            return False
        st.retryRequest = value
        if self.status.phase != "Stalled":
            return False
        for stage in set(st.attempts) | set(st.children):
            if stage in st.completed or stage not in b.STAGES:  # the server keeps its name
                continue
            st.attempts[stage] = st.attempts.get(stage, 0) + 1  # a fresh child name
            st.retryBudgetFrom[stage] = st.attempts[stage]
            st.stageStartedAt.pop(stage, None)
        self.condition("Stalled", False, "RetryRequested", f"{RETRY_ANNOTATION}={value}")
        self.out.events.append(("Normal", "RetryRequested", f"{RETRY_ANNOTATION}={value}"))
        self.set_phase("Pending")
        return True

    async def _run(self) -> None:
        try:
            self.spec = DraftTrainingSpec.model_validate(self.body.get("spec") or {})
        except ValidationError as e:
            await self.stall("InvalidSpec", _short_errors(e))
        st = self.status
        await self.watch_serving()
        ids = b.stage_ids(self.spec, st.retrainNonce)
        run_id = b.run_id_of(self.spec, st.retrainNonce)
        if st.run.id != run_id:
            if self._hold_for_manual_retrain():
                raise _Stop
            self._start_run(run_id, ids)
        st.conditions = [c for c in st.conditions if c.type != "RetrainRequired"]  # not waiting (any more)
        retried = self._handle_retry_request()
        self.compare_on_new_target = bool(
            st.serving.runId
            and st.serving.checkpoint
            and st.serving.runId != run_id
            and (st.serving.targetRevision != self.spec.target.revision
                 or st.serving.retrainNonce != st.retrainNonce)
        )  # fmt: skip
        if self.compare_on_new_target:
            ids = {**ids, "reeval": b.reeval_id(self.spec, st.serving.checkpoint or "", st.retrainNonce)}
        self.run = b.Run(
            self.meta["name"], self.meta["namespace"], self.meta.get("uid", ""), self.spec, run_id,
            attempts=dict(st.run.attempts), training_backend=await self.training_backend(), ids=ids,
        )  # fmt: skip
        st.run.trainingBackend = self.run.training_backend
        st.run.storageUri = self.run.storage_uri
        if not st.run.supersededRemoved:
            await self.remove_superseded_children()
            st.run.supersededRemoved = True

        if self.spec.suspend:
            await self.suspend()
        if st.phase == "Suspended":
            await self.resume()
        if st.phase == "Stalled" and not retried:
            raise _Stop
        if st.phase == "Succeeded" and st.serving.runId == run_id:
            raise _Stop

        # storage + recipe
        try:
            configmap = b.build_recipe_configmap(self.run)
        except (ValidationError, ValueError) as e:
            await self.stall("InvalidRecipe", _short_errors(e) if isinstance(e, ValidationError) else str(e))
        await self.ensure_storage()
        await self.ensure(configmap)
        self.condition("StorageReady", True, "Provisioned", self.run.storage_uri)

        if b.needs_seed(self.run):
            await self.job_stage("seed", b.build_seed_job)
        if st.run.completed.get("regenerate") != self.run.stage_id("regenerate"):
            await self.ensure_server()
            await self.job_stage("regenerate", b.build_regenerate_job)
        else:
            self.condition("Regenerated", True, "Succeeded", st.run.children.get("regenerate", ""))
        await self.scale_server_to_zero("regeneration finished")

        await self.job_stage("merge", b.build_merge_job)
        if self.spec.features.mode == "offline":
            await self.job_stage("features", b.build_features_job)
        await self.job_stage("train", b.build_training)
        await self.evaluate()
        serving_on_new_target = await self.reevaluate_serving() if self.compare_on_new_target else None
        self.apply_gate(serving_on_new_target)
        if self.spec.export.enabled:
            ckpt = st.results.checkpoint
            await self.job_stage("export", lambda r: b.build_export_job(r, ckpt))
        draft_uri = self.run.layout().export_dir if self.spec.export.enabled else st.results.checkpoint
        if self.spec.publish is not None:
            draft_uri = await self.publish(draft_uri or "")
        previous = st.serving.runId
        st.serving = Serving(
            runId=self.run.run_id,
            checkpoint=st.results.checkpoint,
            exportUri=self.run.layout().export_dir if self.spec.export.enabled else None,
            targetRevision=st.run.targetRevision,
            macroAcceptLength=st.results.macroAcceptLength,
            since=self.now(),
            retrainNonce=st.retrainNonce,
        )
        st.checkpointUri = st.results.checkpoint
        st.trainedTargetRevision = st.run.targetRevision
        if previous and previous != self.run.run_id:
            self.out.events.append(
                (
                    "Normal",
                    "Promoted",
                    (st.promotion.reason if st.promotion.runId == self.run.run_id else None)
                    or f"run {self.run.run_id} replaces {previous}",
                )
            )
        if self.spec.monitoring is not None:  # the monitor restarts on the new draft with its baseline
            st.drift = Drift(baseline=st.serving.macroAcceptLength, draftVersion=self.run.run_id,
                             state="reset", reason="new serving draft: baseline reset", checkedAt=self.now())  # fmt: skip
            self.out.events.append(
                (
                    "Normal",
                    "BaselineReset",
                    f"live baseline {st.serving.macroAcceptLength} (run {self.run.run_id})",
                )
            )
            await self.ensure_monitor(self.run)
        self.set_phase("Succeeded", f"draft serving with accepted length {st.results.macroAcceptLength}")
        if self.spec.storage.pruneSuperseded:
            await self.prune_superseded_folders()

    async def prune_superseded_folders(self) -> None:
        """Best effort, once per run: a Job deletes older runs' folders (a refusal blocks nothing)."""
        try:
            await self.ensure(b.build_prune_job(self.run))
        except _Stop:
            self.blocked = None

    async def training_backend(self) -> str:
        if self.status.run.trainingBackend:
            return self.status.run.trainingBackend
        wanted = self.spec.training.backend
        if wanted != "auto":
            return wanted
        if await self.api.served("kubeflow.org/v1", "PyTorchJob"):
            return "pytorchjob"
        if await self.api.served("trainer.kubeflow.org/v1alpha1", "TrainJob"):
            return "trainjob"
        await self.stall(
            "NoTrainingBackend",
            "neither kubeflow.org/v1 PyTorchJob nor trainer.kubeflow.org TrainJob is served",
        )
        raise AssertionError  # unreachable

    # ---- storage -----------------------------------------------------------------------------------

    async def ensure_storage(self) -> None:
        """The run volume; a larger ``storage.pvc.size`` expands the existing claim."""
        pvc = b.build_pvc(self.run)
        if pvc is None:
            return
        live = await self.ensure(pvc)
        want = pvc["spec"]["resources"]["requests"]["storage"]
        have = (((live.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")
        if have and have != want and _quantity(want) > _quantity(have):
            await self.api.patch(
                "v1", "PersistentVolumeClaim", self.run.namespace, pvc["metadata"]["name"],
                {"spec": {"resources": {"requests": {"storage": want}}}},
            )  # fmt: skip
            self.out.events.append(
                ("Normal", "VolumeExpanding", f"{pvc['metadata']['name']}: {have} -> {want}")
            )

    # ---- the SGLang server -------------------------------------------------------------------------

    async def ensure_server(self) -> None:
        dep = await self.ensure(b.build_server_deployment(self.run))
        await self.ensure(b.build_server_service(self.run))
        if await self.api.served("monitoring.coreos.com/v1", "PodMonitor"):
            await self.ensure(b.build_pod_monitor(self.run))
        name = dep["metadata"]["name"]
        self.status.run.children["server"] = name
        if (dep.get("spec") or {}).get("replicas", 1) < 1:  # scaled down earlier (stall, suspend)
            await self.api.patch("apps/v1", "Deployment", self.run.namespace, name, {"spec": {"replicas": 1}})
            self.status.run.stageStartedAt["server"] = self.now()
        if ((dep.get("status") or {}).get("readyReplicas") or 0) < 1:
            self.condition("ServerReady", False, "Starting", "waiting for /health_generate")
            self.set_phase("StartingServer")
            await self.check_deadline("server", dep)
            raise _Stop
        self.status.run.stageStartedAt.pop("server", None)
        self.condition("ServerReady", True, "Ready", b.server_url(self.run))

    async def scale_server_to_zero(self, why: str) -> None:
        name = b.server_name(self.run)
        dep = await self.api.get("apps/v1", "Deployment", self.run.namespace, name)
        if dep is not None and (dep.get("spec") or {}).get("replicas", 1) > 0:
            await self.api.patch("apps/v1", "Deployment", self.run.namespace, name, {"spec": {"replicas": 0}})
            self.out.events.append(("Normal", "ServerScaledDown", f"{name} scaled to zero: {why}"))
        if dep is not None:
            self.condition("ServerReady", False, "ScaledDown", why)

    # ---- GPU hygiene -------------------------------------------------------------------------------

    async def remove_superseded_children(self) -> None:
        """Delete children of other runs (their stage id is not the current one): no GPU is left behind.

        The volume is never touched; ConfigMaps still mounted by a kept child stay.
        """
        run = self.run
        current = {k: run.stage_id(k) for k in (*b.STAGES, "server", "summary")}
        selector = {"app.kubernetes.io/instance": run.name, "app.kubernetes.io/managed-by": b.MANAGED_BY}
        kept: list[dict[str, Any]] = []
        doomed: list[tuple[str, str, dict[str, Any]]] = []
        for api_version, kind in (*WORKLOAD_KINDS, *OTHER_KINDS):
            if not await self.served(api_version, kind):
                continue
            # items of a list carry no apiVersion/kind on a real API server: keep the loop's
            for obj in await self.api.list(api_version, kind, run.namespace, selector):
                labels = obj["metadata"].get("labels") or {}
                component = labels.get("app.kubernetes.io/component", "")
                if kind == "ConfigMap":
                    superseded = labels.get("deepspec.io/run") != run.run_id
                else:
                    superseded = (
                        component in current and labels.get("deepspec.io/stage-id") != current[component]
                    )
                if superseded:
                    doomed.append((api_version, kind, obj))
                else:
                    kept.append(obj)
        mounted = set().union(*(_configmaps_referenced(o.get("spec")) for o in kept)) if kept else set()
        for api_version, kind, obj in doomed:
            name = obj["metadata"]["name"]
            if kind == "ConfigMap" and name in mounted:
                continue
            if await self.api.delete(api_version, kind, run.namespace, name):
                self.out.deleted.append(f"{kind}/{name}")
        if self.out.deleted:
            self.out.events.append(
                ("Normal", "SupersededChildrenDeleted", ", ".join(self.out.deleted)[:1000])
            )

    async def served(self, api_version: str, kind: str) -> bool:
        return (
            "/" not in api_version
            or api_version in ("apps/v1", "batch/v1")
            or await self.api.served(api_version, kind)
        )

    # ---- suspend / resume --------------------------------------------------------------------------

    def _suspend_patch(self, kind: str, value: bool) -> dict[str, Any]:
        if kind == "PyTorchJob":
            return {"spec": {"runPolicy": {"suspend": value}}}
        return {"spec": {"suspend": value}}

    def _current_jobs(self) -> list[tuple[str, str, str]]:
        out = []
        for stage, name in self.status.run.children.items():
            if stage == "server" or stage in self.status.run.completed:
                continue
            if stage == "train":
                kind = "TrainJob" if self.run.training_backend == "trainjob" else "PyTorchJob"
                api_version = "trainer.kubeflow.org/v1alpha1" if kind == "TrainJob" else "kubeflow.org/v1"
            else:
                kind, api_version = "Job", "batch/v1"
            out.append((api_version, kind, name))
        return out

    async def suspend(self) -> None:
        """Suspend the running Jobs (Kubernetes deletes their pods) and scale the server to zero."""
        if self.status.phase != "Suspended":
            for api_version, kind, name in self._current_jobs():
                with contextlib.suppress(KubeError):
                    await self.api.patch(
                        api_version, kind, self.run.namespace, name, self._suspend_patch(kind, True)
                    )
            await self.scale_server_to_zero("suspended")
            self.status.run.stageStartedAt.clear()
            self.status.message = None
        self.condition("Suspended", True, "Suspended", "spec.suspend is true")
        self.set_phase("Suspended", "spec.suspend is true")
        raise _Stop

    async def resume(self) -> None:
        for api_version, kind, name in self._current_jobs():
            with contextlib.suppress(KubeError):
                await self.api.patch(
                    api_version, kind, self.run.namespace, name, self._suspend_patch(kind, False)
                )
        self.condition("Suspended", False, "Resumed", "spec.suspend is false")
        self.set_phase("Pending")

    # ---- evaluation and the gate -------------------------------------------------------------------

    async def evaluate(self) -> None:
        st = self.status
        await self.job_stage("evaluate", b.build_evaluate_job)
        eval_id = self.run.stage_id("evaluate")
        if st.results.evaluateId == eval_id:
            return
        job = st.run.children.get("evaluate") or self.run.child_name("evaluate")
        summary = await self._summary_of(job)
        if summary is None:  # the pod is gone (evicted, garbage-collected): read summary.json instead
            await self.job_stage("summary", b.build_summary_job)
            summary = await self._summary_of(st.run.children["summary"])
        if summary is None:
            await self.stall("NoEvalSummary", f"neither {job} nor its summary reader left a summary")
        st.results = Results(
            runId=self.run.run_id,
            evaluateId=eval_id,
            macroAcceptLength=summary.macro_accept_length,
            benchmarks={k: v.model_dump() for k, v in summary.benchmarks.items()},
            checkpoint=summary.checkpoint or b.checkpoint_dir(self.run),
            targetRevision=summary.target_revision or st.run.targetRevision,
            evaluatedAt=self.now(),
        )

    async def _summary_of(self, job: str) -> EvalSummary | None:
        pods = await self.api.list("v1", "Pod", self.run.namespace, {"job-name": job})
        try:
            return parse_termination_message(pods)
        except (ValueError, ValidationError) as e:
            await self.stall("BadEvalSummary", f"termination message of {job} is not a summary: {e}")
        return None

    def apply_gate(self, serving_on_new_target: float | None = None) -> None:
        """The acceptance gate (deepspec.eval.summary.gate_decision), on every pass: a gate change
        re-gates the existing result; ``GateFailed`` lasts until the gate or the run changes.

        After a target update (``serving_on_new_target``: the serving draft re-evaluated on the new
        target), the new draft is also promoted only if it beats that figure
        (:func:`deepspec.monitor.lifecycle.promotion_decision`); otherwise the serving draft stays.
        """
        st = self.status
        base = serving_on_new_target if serving_on_new_target is not None else baseline(self.spec, st)
        decision = gate_decision(st.results.macroAcceptLength, self.spec.evaluation.gate, base)
        passed, reason, why = decision.passed, decision.reason, "BelowGate"
        if passed and serving_on_new_target is not None and st.results.macroAcceptLength is not None:
            promo = promotion_decision(
                st.results.macroAcceptLength, serving_on_new_target, min_gain=self.spec.retrain.minGain
            )
            passed, reason, why = promo.act, promo.reason, "NotBetterThanServing"
            decided = Promotion(runId=self.run.run_id, promoted=promo.act,
                                candidateAcceptLength=st.results.macroAcceptLength,
                                servingAcceptLength=serving_on_new_target, reason=promo.reason)  # fmt: skip
            if st.promotion != decided:
                st.promotion = decided
                if not promo.act:
                    self.out.events.append(("Warning", "NotPromoted", promo.reason))
        st.results.gatePassed = passed
        self.condition("GatePassed", passed, "Passed" if passed else why, reason)
        if not passed:
            self.set_phase("GateFailed", reason)
            raise _Stop

    # ---- the serving side: re-evaluation, publication, serving resource, live monitor ---------------

    async def reevaluate_serving(self) -> float:
        """The serving draft's accepted length on the current target (an evaluation Job of its
        checkpoint, with the candidate's benchmarks)."""
        st = self.status
        ckpt = st.serving.checkpoint or ""
        await self.job_stage("reeval", lambda r: b.build_reeval_job(r, ckpt))
        if st.promotion.runId == self.run.run_id and st.promotion.servingAcceptLength is not None:
            return st.promotion.servingAcceptLength
        job = st.run.children["reeval"]
        summary = await self._summary_of(job)
        if summary is None:
            await self.stall("NoEvalSummary", f"{job} (serving draft on the new target) left no summary")
        value = summary.macro_accept_length
        st.promotion = Promotion(runId=self.run.run_id, servingAcceptLength=value)
        self.out.events.append(
            ("Normal", "ServingReevaluated",
             f"serving draft {st.serving.runId}: accepted length {value:.3f} on target revision "
             f"{self.spec.target.revision} (was {st.serving.macroAcceptLength} on {st.serving.targetRevision})")
        )  # fmt: skip
        return value

    async def publish(self, draft_uri: str) -> str:
        """Publish the draft (a Job running ``deepspec operator publish``), then point the serving
        resource named in ``spec.publish.servingRef`` at the published version. Returns its URI."""
        st, run = self.status, self.run
        metadata = {"resource": f"{run.namespace}/{run.name}", "run": run.run_id,
                    "targetRevision": st.run.targetRevision, "acceptLength": st.results.macroAcceptLength}  # fmt: skip
        await self.job_stage("publish", lambda r: b.build_publish_job(r, draft_uri, metadata))
        uri = b.published_uri(run)
        st.publication = Publication(version=b.publish_version(run), uri=uri)
        ref = self.spec.publish.servingRef if self.spec.publish else None
        if ref is None:
            return uri
        what = f"{ref.kind} {run.namespace}/{ref.name}"
        live = await self.api.get(ref.apiVersion, ref.kind, run.namespace, ref.name)
        if live is None:
            await self.stall("ServingRefNotFound", f"{what} (spec.publish.servingRef) does not exist")
        try:
            patch = b.serving_patch(ref, live, uri)
        except ValueError as e:
            await self.stall("ServingRefInvalid", f"{what}: {e}")
        if patch is not None:
            try:
                await self.api.patch(ref.apiVersion, ref.kind, run.namespace, ref.name, patch)
            except KubeError as e:
                if e.status not in (403, 404, 422):
                    raise
                await self.stall("ServingUpdateRefused", f"patch {what}: HTTP {e.status}: {e.detail}")
            self.out.events.append(("Normal", "ServingUpdated", f"{what} now serves {uri}"))
        st.publication.servingRef = what
        self.condition("ServingUpdated", True, "Patched", f"{what} -> {uri}")
        return uri

    async def ensure_monitor(self, run: b.Run) -> None:
        """The monitor Deployment (+ Service, + PodMonitor when served) for the serving draft; a
        Deployment watching another draft or baseline gets the new arguments (it restarts)."""
        st = self.status
        want = b.build_monitor_deployment(run, st.serving.runId or "", st.serving.macroAcceptLength)
        live = await self.ensure(want)
        containers = (((live.get("spec") or {}).get("template") or {}).get("spec") or {}).get(
            "containers"
        ) or []
        if (
            not containers
            or containers[0].get("command") != want["spec"]["template"]["spec"]["containers"][0]["command"]
        ):
            await self.api.patch("apps/v1", "Deployment", run.namespace, want["metadata"]["name"],
                                 {"spec": {"template": want["spec"]["template"]}})  # fmt: skip
            self.out.events.append(
                ("Normal", "MonitorUpdated", f"{want['metadata']['name']} watches draft {st.serving.runId}")
            )
        await self.ensure(b.build_monitor_service(run))
        if await self.api.served("monitoring.coreos.com/v1", "PodMonitor"):
            await self.ensure(b.build_monitor_pod_monitor(run))

    async def remove_monitor(self, run: b.Run) -> None:
        name = b.monitor_name(run)
        for api_version, kind in (("apps/v1", "Deployment"), ("v1", "Service"),
                                  ("monitoring.coreos.com/v1", "PodMonitor")):  # fmt: skip
            if await self.served(api_version, kind) and await self.api.delete(
                api_version, kind, run.namespace, name
            ):
                self.out.deleted.append(f"{kind}/{name}")

    async def watch_serving(self) -> None:
        """Every pass: keep the live monitor of the serving draft, read its decision into
        ``status.drift``, and apply ``spec.retrain.policy`` ``onDrift``."""
        st, spec = self.status, self.spec
        light = b.Run(self.meta["name"], self.meta["namespace"], self.meta.get("uid", ""), spec,
                      st.run.id or "", ids=b.stage_ids(spec, st.retrainNonce))  # fmt: skip
        if spec.monitoring is None:
            if st.drift is not None:
                await self.remove_monitor(light)
                st.drift = None
            return
        if not st.serving.runId:
            return  # nothing serves yet
        await self.ensure_monitor(light)
        version = st.serving.runId
        decision = parse_monitor_metrics(await self.read_metrics(b.monitor_url(light)), version, self.now())
        previous = st.drift
        st.drift = Drift(
            state=decision.state.value, drift=decision.drift, observed=decision.observed,
            baseline=decision.baseline if decision.baseline is not None else st.serving.macroAcceptLength,
            since=decision.to_status()["since"], draftVersion=version, reason=decision.reason,
            checkedAt=self.now(),
        )  # fmt: skip
        if decision.drift and not (previous and previous.drift):
            self.out.events.append(("Warning", "LiveDrift", f"draft {version}: {decision.reason}"))
        idle = st.phase in ("Succeeded", "GateFailed") and st.run.id == st.serving.runId
        retrain = should_retrain(
            spec.retrain.policy,
            target_revision=spec.target.revision or "",
            serving_target_revision=spec.target.revision or "",  # revision changes start runs by themselves
            drift=decision,
            run_in_progress=not idle,
        )
        if retrain.act:
            st.retrainNonce = self.now()
            self.out.events.append(("Normal", "RetrainOnDrift", retrain.reason))

    def _hold_for_manual_retrain(self) -> bool:
        """``retrain.policy: manual``: a new target revision while a draft serves waits for a new
        ``deepspec.io/retrain`` annotation value (any other spec change starts its run at once)."""
        st, spec = self.status, self.spec
        if spec.retrain.policy != "manual" or not st.serving.runId or st.serving.runId != st.run.id:
            return False
        if st.serving.targetRevision == spec.target.revision:
            return False
        value = (self.meta.get("annotations") or {}).get(RETRAIN_ANNOTATION)
        if value and value != st.retrainRequest:
            st.retrainRequest = value
            self.out.events.append(("Normal", "RetrainRequested", f"{RETRAIN_ANNOTATION}={value}"))
            return False
        decision = should_retrain("manual", target_revision=spec.target.revision or "",
                                  serving_target_revision=st.serving.targetRevision)  # fmt: skip
        message = (f"target revision {spec.target.revision} is not the serving draft's "
                   f"({st.serving.targetRevision}); {decision.reason} or annotate {RETRAIN_ANNOTATION}")  # fmt: skip
        if self.old_conditions.get("RetrainRequired") != ("True", message):
            self.out.events.append(("Normal", "RetrainRequired", message))
        self.condition("RetrainRequired", True, "ManualPolicy", message)
        return True


def baseline(spec: DraftTrainingSpec, status: DraftTrainingStatus) -> float | None:
    """The accepted length to beat: the serving draft's (of another run), else the spec's baseline."""
    if status.serving.macroAcceptLength is not None and status.serving.runId != status.run.id:
        return status.serving.macroAcceptLength
    return spec.evaluation.baselineAcceptLength


_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
           "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}  # fmt: skip


def _quantity(q: str) -> float:
    """Bytes of a Kubernetes storage quantity (``500Gi``, ``1T``, ``1e9``)."""
    for suffix in sorted(_SUFFIX, key=len, reverse=True):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * _SUFFIX[suffix]
    return float(q)


def _short_errors(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in x['loc']) or 'spec'}: {x['msg']}" for x in e.errors())[:1000]


async def reconcile(
    api: KubeApi,
    body: dict[str, Any],
    now: Callable[[], str] = now_iso,
    read_metrics: MetricsReader = http_metrics,
) -> Outcome:
    """One level-based pass; see the module docstring. API errors propagate (the loop retries)."""
    return await Reconciler(api, body, now, read_metrics).run_pass()


def merge_patch_diff(old: Any, new: Any) -> Any:
    """The JSON merge patch turning ``old`` into ``new`` (removed keys become null)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for k, v in new.items():
        if k not in old or old[k] != v:
            patch[k] = merge_patch_diff(old.get(k), v)
    return patch


async def apply_outcome(api: KubeApi, body: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    """Write the status subresource and post the Events."""
    meta = body["metadata"]
    status = merge_patch_diff(
        body.get("status") or {}, outcome.status.model_dump(mode="json", exclude_none=True)
    )
    patched = await api.patch(
        body.get("apiVersion", "deepspec.io/v1alpha1"), "DraftTraining", meta["namespace"], meta["name"],
        {"status": status}, subresource="status",
    )  # fmt: skip
    for type_, reason, message in outcome.events:
        with contextlib.suppress(KubeError):  # events are best effort
            await api.event(body, type_, reason, message)
    return patched
