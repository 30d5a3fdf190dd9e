"""Level-based reconciliation of one ``DraftTraining``.

:func:`reconcile` looks at the spec, the previous status and the children that exist, creates what
is missing for the current stage, and returns the new status plus the Events to post. It is called
periodically (a kopf timer); calling it twice in a row changes nothing the second time, and a fresh
operator process picks up exactly where the previous one stopped (children are found by their
deterministic names, creation is idempotent).

Stages of a run: storage -> SGLang server -> regenerate (Indexed Job) -> server scaled to zero ->
merge -> [features] -> train (PyTorchJob | TrainJob) -> evaluate -> gate -> [export] -> Succeeded.
A failed stage is re-created with ``-r<N>`` up to ``spec.maxRetries`` times, then the resource is
``Stalled``. A new run id (e.g. a new ``spec.target.revision``) starts a new run; ``status.serving``
keeps the previous draft until the new one passes the gate.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from deepspec.operator import builders as b
from deepspec.operator.kube import KubeApi, KubeError
from deepspec.operator.spec import (
    Condition,
    DraftTrainingSpec,
    DraftTrainingStatus,
    Results,
    RunStatus,
    Serving,
)

TERMINAL = ("Succeeded", "GateFailed", "Stalled")
STAGE_CONDITIONS = {
    "storage": "StorageReady",
    "server": "ServerReady",
    "regenerate": "Regenerated",
    "merge": "Merged",
    "features": "FeaturesCached",
    "train": "Trained",
    "evaluate": "Evaluated",
    "gate": "GatePassed",
    "export": "Exported",
}
STAGE_PHASES = {
    "regenerate": "Regenerating",
    "merge": "Merging",
    "features": "CachingFeatures",
    "train": "Training",
    "evaluate": "Evaluating",
    "export": "Exporting",
}


class EvalSummary(BaseModel):
    """The compact evaluation summary written to the termination log (< 4 KiB)."""

    v: int = 1
    algorithm: str | None = None
    target_revision: str | None = None
    checkpoint: str | None = None
    macro_accept_length: float
    benchmarks: dict[str, dict[str, Any]] = {}


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Outcome:
    """What one reconcile decided: the new status and the Events to post (type, reason, message)."""

    status: DraftTrainingStatus
    events: list[tuple[str, str, str]] = field(default_factory=list)
    created: list[str] = field(default_factory=list)


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
                return EvalSummary.model_validate(json.loads(term["message"]))
    return None


class Reconciler:
    """One pass over one resource. Construct, then ``await run()``."""

    def __init__(self, api: KubeApi, body: dict[str, Any], now: Callable[[], str] = now_iso) -> None:
        self.api = api
        self.body = body
        self.now = now
        self.meta = body["metadata"]
        self.generation = self.meta.get("generation")
        try:
            self.status = DraftTrainingStatus.model_validate(body.get("status") or {})
        except ValidationError:
            self.status = DraftTrainingStatus()
        self.old_phase = self.status.phase
        self.out = Outcome(self.status)

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

    def stall(self, reason: str, message: str) -> None:
        self.set_phase("Stalled", message)
        self.condition("Stalled", True, reason, message)
        raise _Stop

    def finish(self) -> Outcome:
        s = self.status
        s.observedGeneration = self.generation
        terminal = s.phase in TERMINAL
        if s.phase != "Stalled":
            self.condition("Stalled", False, "Progressing" if not terminal else s.phase)
        self.condition("Reconciling", not terminal, s.phase or "Pending", s.message or "")
        self.condition("Ready", s.phase == "Succeeded", s.phase or "Pending", s.message or "")
        if s.phase != self.old_phase:
            kind = "Warning" if s.phase in ("Stalled", "GateFailed") else "Normal"
            self.out.events.append((kind, s.phase or "Pending", s.message or f"phase {s.phase}"))
        return self.out

    # ---- child helpers -----------------------------------------------------------------------------

    async def ensure(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The live object, created from ``obj`` when absent (idempotent)."""
        meta = obj["metadata"]
        live = await self.api.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        if live is None:
            live, created = await self.api.create(obj)
            if created:
                self.out.created.append(f"{obj['kind']}/{meta['name']}")
        return live

    async def job_stage(self, stage: str, build: Callable[[b.Run], dict[str, Any]]) -> None:
        """Drive one Job-like stage; returns when it succeeded, raises _Stop otherwise."""
        cond = STAGE_CONDITIONS[stage]
        while True:
            obj = build(self.run)
            live = await self.ensure(obj)
            self.status.run.children[stage] = obj["metadata"]["name"]
            state, message = job_state(live)
            if state == "Succeeded":
                self.condition(cond, True, "Succeeded", obj["metadata"]["name"])
                return
            if state == "Running":
                self.condition(cond, False, "InProgress", obj["metadata"]["name"])
                self.set_phase(STAGE_PHASES[stage])
                raise _Stop
            attempt = self.status.run.attempts.get(stage, 0)
            if attempt >= self.spec.maxRetries:
                self.condition(cond, False, "Failed", message)
                self.stall(
                    f"{stage.capitalize()}Failed",
                    f"{obj['kind']} {obj['metadata']['name']} failed after {attempt + 1} attempt(s): {message}",
                )
            self.status.run.attempts[stage] = attempt + 1
            self.run = b.Run(**{**self.run.__dict__, "attempts": dict(self.status.run.attempts)})
            self.out.events.append(
                ("Warning", "Retrying", f"{stage} failed ({message}); attempt {attempt + 2}")
            )

    # ---- the pass ----------------------------------------------------------------------------------

    async def run_pass(self) -> Outcome:
        with contextlib.suppress(_Stop):
            await self._run()
        return self.finish()

    async def _run(self) -> None:
        try:
            self.spec = DraftTrainingSpec.model_validate(self.body.get("spec") or {})
        except ValidationError as e:
            self.stall("InvalidSpec", _short_errors(e))
        run_id = b.run_id_of(self.spec)
        st = self.status
        if st.run.id != run_id:
            if st.run.id is not None:
                self.out.events.append(("Normal", "NewRun", f"spec changed: run {st.run.id} -> {run_id}"))
            st.run = RunStatus(id=run_id, targetRevision=self.spec.target.revision, startedAt=self.now())
            st.conditions = [c for c in st.conditions if c.type in ("Ready", "Reconciling", "Stalled")]
            self.set_phase("Pending")
        elif st.phase in TERMINAL:
            raise _Stop
        self.run = b.Run(
            self.meta["name"], self.meta["namespace"], self.meta.get("uid", ""), self.spec, run_id,
            attempts=dict(st.run.attempts), training_backend=await self.training_backend(),
        )  # fmt: skip
        st.run.trainingBackend = self.run.training_backend
        st.run.storageUri = self.run.storage_uri

        # storage + recipe
        try:
            configmap = b.build_recipe_configmap(self.run)
        except (ValidationError, ValueError) as e:
            self.stall("InvalidRecipe", _short_errors(e) if isinstance(e, ValidationError) else str(e))
        pvc = b.build_pvc(self.run)
        if pvc is not None:
            await self.ensure(pvc)
        await self.ensure(configmap)
        self.condition("StorageReady", True, "Provisioned", self.run.storage_uri)

        # server + regeneration
        regen = await self.api.get("batch/v1", "Job", self.run.namespace, self.run.child_name("regenerate"))
        if regen is None or job_state(regen)[0] != "Succeeded":
            await self.ensure_server()
            await self.job_stage("regenerate", b.build_regenerate_job)
        else:
            self.condition("Regenerated", True, "Succeeded", regen["metadata"]["name"])
        await self.scale_server_to_zero()

        await self.job_stage("merge", b.build_merge_job)
        if self.spec.features.mode == "offline":
            await self.job_stage("features", b.build_features_job)
        await self.job_stage("train", b.build_training)
        await self.evaluate()
        if self.spec.export.enabled:
            ckpt = st.results.checkpoint
            await self.job_stage("export", lambda r: b.build_export_job(r, ckpt))
        st.serving = Serving(
            runId=self.run.run_id,
            checkpoint=st.results.checkpoint,
            exportUri=self.run.under_run("export") if self.spec.export.enabled else None,
            targetRevision=st.run.targetRevision,
            macroAcceptLength=st.results.macroAcceptLength,
            since=self.now(),
        )
        st.checkpointUri = st.results.checkpoint
        st.trainedTargetRevision = st.run.targetRevision
        self.set_phase("Succeeded", f"draft serving with accepted length {st.results.macroAcceptLength}")

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
        self.stall(
            "NoTrainingBackend",
            "neither kubeflow.org/v1 PyTorchJob nor trainer.kubeflow.org TrainJob is served",
        )
        raise AssertionError  # unreachable

    async def ensure_server(self) -> None:
        dep = await self.ensure(b.build_server_deployment(self.run))
        await self.ensure(b.build_server_service(self.run))
        if await self.api.served("monitoring.coreos.com/v1", "PodMonitor"):
            await self.ensure(b.build_pod_monitor(self.run))
        self.status.run.children["server"] = dep["metadata"]["name"]
        if ((dep.get("status") or {}).get("readyReplicas") or 0) < 1:
            self.condition("ServerReady", False, "Starting", "waiting for /health_generate")
            self.set_phase("StartingServer")
            raise _Stop
        self.condition("ServerReady", True, "Ready", b.server_url(self.run))

    async def scale_server_to_zero(self) -> None:
        name = b.server_name(self.run)
        dep = await self.api.get("apps/v1", "Deployment", self.run.namespace, name)
        if dep is not None and (dep.get("spec") or {}).get("replicas", 1) > 0:
            await self.api.patch("apps/v1", "Deployment", self.run.namespace, name, {"spec": {"replicas": 0}})
            self.out.events.append(
                ("Normal", "ServerScaledDown", f"{name} scaled to zero after regeneration")
            )
        self.condition("ServerReady", False, "ScaledDown", "regeneration finished")

    async def evaluate(self) -> None:
        st = self.status
        await self.job_stage("evaluate", b.build_evaluate_job)
        if st.results.runId != self.run.run_id:
            job = self.run.child_name("evaluate")
            pods = await self.api.list("v1", "Pod", self.run.namespace, {"job-name": job})
            try:
                summary = parse_termination_message(pods)
            except (ValueError, ValidationError) as e:
                self.stall("BadEvalSummary", f"termination message of {job} is not a summary: {e}")
            if summary is None:
                self.stall("NoEvalSummary", f"no pod of {job} left a termination message")
            st.results = Results(
                runId=self.run.run_id,
                macroAcceptLength=summary.macro_accept_length,
                benchmarks={k: v for k, v in summary.benchmarks.items()},
                checkpoint=summary.checkpoint or b.checkpoint_dir(self.run),
                targetRevision=summary.target_revision or st.run.targetRevision,
                evaluatedAt=self.now(),
            )
        passed, why = gate(self.spec, st)
        st.results.gatePassed = passed
        self.condition("GatePassed", passed, "Passed" if passed else "BelowGate", why)
        if not passed:
            self.set_phase("GateFailed", why)
            raise _Stop


def baseline(spec: DraftTrainingSpec, status: DraftTrainingStatus) -> float | None:
    """The accepted length to beat: the serving draft's, else the spec's baseline."""
    if status.serving.macroAcceptLength is not None and status.serving.runId != status.run.id:
        return status.serving.macroAcceptLength
    return spec.evaluation.baselineAcceptLength


def gate(spec: DraftTrainingSpec, status: DraftTrainingStatus) -> tuple[bool, str]:
    """(passed, explanation) of the acceptance gate for ``status.results``."""
    g, tau = spec.evaluation.gate, status.results.macroAcceptLength
    if tau is None:
        return False, "no evaluation result"
    if g.min_accept_length is not None and tau < g.min_accept_length:
        return False, f"accepted length {tau:.3f} < min_accept_length {g.min_accept_length}"
    base = baseline(spec, status)
    if g.max_drop is not None and base is not None and tau < base - g.max_drop:
        return False, f"accepted length {tau:.3f} dropped more than {g.max_drop} below baseline {base:.3f}"
    return True, f"accepted length {tau:.3f}" + (f" (baseline {base:.3f})" if base is not None else "")


def _short_errors(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in x['loc']) or 'spec'}: {x['msg']}" for x in e.errors())[:1000]


async def reconcile(api: KubeApi, body: dict[str, Any], now: Callable[[], str] = now_iso) -> Outcome:
    """One level-based pass; see the module docstring. API errors propagate (kopf retries the timer)."""
    return await Reconciler(api, body, now).run_pass()


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
