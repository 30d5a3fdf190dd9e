"""Pure builder functions: ``DraftTraining`` spec -> the plain-dict Kubernetes objects of each stage.

Nothing here talks to the API server. Every function takes a :class:`Run` (the resource's identity,
its parsed spec and the stage ids) and returns a dict ready to POST. All Kubernetes knowledge of the
operator lives in this file, so it is what the schema and golden-file tests exercise.

**Identity per stage** (:func:`stage_ids`): each stage's id hashes the ids of the stages it reads
from plus the user's own inputs of that stage, dumped with ``exclude_defaults`` so that a field left
at its default counts as absent. Hence a gate change re-gates only (the gate is applied by the
operator, it is no stage's input), an evaluation change re-evaluates only, a new target revision
re-runs everything, placement/images/resources re-run nothing, and an operator upgrade that adds a
field with a default re-runs nothing. Artefacts live in per-stage folders (``train-<id>/draft``...)
so an unchanged stage's output is reused as is.

Conventions for every child:

* name = ``<resource>-<stage>-<stage id>``, ``-r<N>`` for attempt N;
* a controller owner reference to the ``DraftTraining`` (garbage-collected with it), except the
  volume under the default ``Retain`` policy;
* labels of our own only (``app.kubernetes.io/*``, ``deepspec.io/run``, ``deepspec.io/stage-id``): the
  resource's own labels are never copied (GitOps tools would prune the children as their own); pod
  labels and annotations come from ``spec.podTemplate``;
* every Job runs the ``deepspec`` CLI with the recipe mounted at ``/etc/deepspec/recipe.yaml``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import yaml

from deepspec.config import Recipe, apply_overrides
from deepspec.layout import RunLayout
from deepspec.operator.spec import (
    DEFAULT_IMAGE,
    GROUP,
    IMAGE_ENV,
    KIND,
    VERSION,
    DraftTrainingSpec,
    PodTemplate,
)

RECIPE_DIR = "/etc/deepspec"
RECIPE_PATH = f"{RECIPE_DIR}/recipe.yaml"
DATA_MOUNT = "/data"
CACHE_MOUNT = "/cache"
MANAGED_BY = "deepspec-operator"
TERMINATION_LOG = "/dev/termination-log"
STAGES = ("seed", "regenerate", "merge", "features", "train", "evaluate", "export")
#: Stages that write a ``<stage>-<id>/`` folder under the run root.
FOLDER_STAGES = ("regenerate", "features", "train", "evaluate", "export")
JOB_STAGES = ("seed", "regenerate", "merge", "features", "evaluate", "export", "summary")
CPU_REQUESTS = {"cpu": "1", "memory": "2Gi"}
GPU_REQUESTS_PER_GPU = {"cpu": 4, "memory": 16}  # cores, GiB per GPU when the user gives no requests


def short_hash(data: Any, n: int = 8) -> str:
    """Stable short hash of JSON-able data."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _user(model: Any, *fields: str) -> dict[str, Any]:
    """The fields of ``model`` the user set to a non-default value (absent = default)."""
    return model.model_dump(mode="json", include=set(fields) or None, exclude_defaults=True)


def stage_ids(spec: DraftTrainingSpec, nonce: str | None = None) -> dict[str, str]:
    """Id of each stage: its upstream ids + its own user inputs (see the module docstring).

    ``nonce`` (``status.retrainNonce``, set by a drift-triggered retrain) counts as a target input:
    the target changed behind an unchanged revision, so everything from regeneration on runs again.
    """
    s = spec
    target = _user(s.target, "model", "revision", "dtype", "trustRemoteCode")
    if nonce:
        target["retrainNonce"] = nonce
    ids: dict[str, str] = {}
    ids["seed"] = short_hash(
        ["seed", _user(s.dataset, "path", "source"),
         _user(s.evaluation, "benchmarksDir", "benchmarks", "benchmarksSource")]
    )  # fmt: skip
    ids["regenerate"] = short_hash(
        # dataset.source is not an input: the seed copies it only when the path is missing
        ["regenerate", target, _user(s.dataset, "path", "format", "maxSamples"),
         _user(s.regeneration, "sampling", "thinking")]
    )  # fmt: skip
    ids["merge"] = ids["regenerate"]
    training = _user(s.training, "algorithm", "epochs", "maxSteps", "recipe", "overrides")
    ids["features"] = short_hash(["features", ids["regenerate"], _user(s.features), training])
    ids["train"] = short_hash(
        ["train", ids["regenerate"], _user(s.features), _user(s.dataset, "maxLength"), training]
    )
    ids["evaluate"] = short_hash(
        ["evaluate", ids["train"],
         _user(s.evaluation, "benchmarksDir", "benchmarks", "caps", "maxPrompts", "numProposals",
               "temperature", "thinking")]
    )  # fmt: skip
    ids["export"] = short_hash(["export", ids["train"], _user(s.export, "format")])
    return ids


def run_id_of(spec: DraftTrainingSpec, nonce: str | None = None) -> str:
    """The run id: all stage ids together (a new id in any stage = a new run)."""
    ids = stage_ids(spec, nonce)
    return short_hash([ids[k] for k in STAGES])


@dataclass(frozen=True)
class Run:
    """Everything a builder needs: the resource identity, its spec and the run being built."""

    name: str
    namespace: str
    uid: str
    spec: DraftTrainingSpec
    run_id: str
    attempts: dict[str, int] = field(default_factory=dict)
    training_backend: str = "pytorchjob"
    ids: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.ids:
            object.__setattr__(self, "ids", stage_ids(self.spec))

    @classmethod
    def from_body(cls, body: dict[str, Any], **kw: Any) -> Run:
        meta = body["metadata"]
        spec = DraftTrainingSpec.model_validate(body.get("spec") or {})
        return cls(
            meta["name"], meta.get("namespace", "default"), meta.get("uid", ""), spec, run_id_of(spec), **kw
        )

    def with_attempts(self, attempts: dict[str, int]) -> Run:
        return Run(**{**self.__dict__, "attempts": dict(attempts)})

    # ---- names -----------------------------------------------------------------------------------

    def stage_id(self, stage: str) -> str:
        """The id of a stage; the server and the eval-summary reader share their stage's id, the
        prune Job is the whole run's."""
        if stage in ("prune", "publish"):
            return self.run_id
        return self.ids[{"server": "regenerate", "summary": "evaluate"}.get(stage, stage)]

    def child_name(self, stage: str) -> str:
        """``<name>-<stage>-<stage id>[-r<N>]``, at most 52 characters (Job pod hostnames add ``-<index>``)."""
        if stage == "recipe":
            suffix = f"-recipe-{self.run_id}"
        else:
            attempt = self.attempts.get(stage, 0)
            suffix = f"-{stage}-{self.stage_id(stage)}" + (f"-r{attempt}" if attempt else "")
        return f"{self.name[: 52 - len(suffix)].rstrip('-')}{suffix}"

    @property
    def pvc_name(self) -> str:
        """One claim per resource (stable: resizing expands it, a new run reuses it)."""
        pvc = self.spec.storage.effective_pvc
        if pvc is not None and pvc.existingClaim:
            return pvc.existingClaim
        return f"{self.name[:47]}-data"

    @property
    def image(self) -> str:
        return self.spec.image or os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE

    @property
    def served_model_name(self) -> str:
        return self.spec.target.servedModelName or posixpath.basename(self.spec.target.model.rstrip("/"))

    @property
    def storage_uri(self) -> str:
        """Root of this resource's artefacts (each stage writes under ``<stage>-<id>/``)."""
        s3 = self.spec.storage.s3
        if s3 is not None:
            prefix = "/".join(p for p in (s3.prefix.strip("/"), self.namespace, self.name) if p)
            return f"s3://{s3.bucket}/{prefix}"
        return f"{DATA_MOUNT}/{self.name}"

    @property
    def volume_root(self) -> str:
        """Where relative user inputs (dataset, benchmarks) live: the volume root or the S3 prefix."""
        s3 = self.spec.storage.s3
        if s3 is not None:
            return f"s3://{s3.bucket}/{s3.prefix.strip('/')}".rstrip("/")
        return DATA_MOUNT

    def resolve(self, path: str) -> str:
        """A user input path: absolute or s3:// as is, relative under the volume root."""
        if path.startswith(("/", "s3://")):
            return path
        return f"{self.volume_root}/{path}"

    def stage_dir(self, stage: str) -> str:
        return f"{self.storage_uri}/{stage}-{self.stage_id(stage)}"

    def under_run(self, path: str) -> str:
        """A user output path (features.cachePath): absolute as is, relative in the features folder."""
        if path.startswith(("/", "s3://")):
            return path
        return f"{self.stage_dir('features')}/{path}"

    def layout(self) -> RunLayout:
        """Every artefact path of this run (deepspec.layout owns the rules)."""
        return RunLayout.from_recipe(build_recipe(self))

    # ---- metadata --------------------------------------------------------------------------------

    def labels(self, component: str) -> dict[str, str]:
        out = {
            "app.kubernetes.io/name": "deepspec",
            "app.kubernetes.io/instance": self.name,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": MANAGED_BY,
            "deepspec.io/run": self.run_id,
        }
        if component in (*STAGES, "server", "summary", "prune", "publish") or component in self.ids:
            out["deepspec.io/stage-id"] = self.stage_id(component)
        return out

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def metadata(self, name: str, component: str) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": self.labels(component),
            "ownerReferences": [self.owner_reference()],
        }


# --------------------------------------------------------------------------------------------------
# The recipe every Job runs with
# --------------------------------------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_recipe(run: Run) -> Recipe:
    """The spec as a :class:`deepspec.config.Recipe` (same models the CLI validates).

    Order: the inline ``training.recipe`` fragment, then the spec's own fields, then the operator's
    paths, then ``training.overrides``. The recipe's gate is left empty: the operator applies
    ``spec.evaluation.gate`` itself (so the evaluation Job succeeds whatever the result and a gate
    change needs no new Job). Raises :class:`pydantic.ValidationError` / ``RecipeError``.
    """
    s = run.spec
    features = s.features.model_dump()
    if features.get("cache_path"):
        features["cache_path"] = run.under_run(features["cache_path"])
    from_spec: dict[str, Any] = {
        "name": run.name,
        "target": {
            "model": s.target.model,
            "revision": s.target.revision,
            "served_model_name": run.served_model_name,
            "dtype": s.target.dtype,
            "trust_remote_code": s.target.trustRemoteCode,
        },
        "data": {
            "path": run.resolve(s.dataset.path),
            "format": s.dataset.format,
            "max_samples": s.dataset.maxSamples,
            "max_length": s.dataset.maxLength,
        },
        "regeneration": {
            "endpoints": [server_url(run)],
            "concurrency": s.regeneration.concurrency,
            "sampling": s.regeneration.sampling.model_dump(),
            "thinking": s.regeneration.thinking,
            "max_retries": s.regeneration.maxRetries,
            "output": f"{run.stage_dir('regenerate')}/regenerated.jsonl",
        },
        "features": features,
        "draft": {"algorithm": s.training.algorithm},
        "training": {
            "output_dir": f"{run.stage_dir('train')}/draft",
            "parallelism": s.training.parallelism,
            "epochs": s.training.epochs,
            "max_steps": s.training.maxSteps,
        },
        "evaluation": {
            "benchmarks_dir": run.resolve(s.evaluation.benchmarksDir),
            "benchmarks": s.evaluation.benchmarks,
            "caps": s.evaluation.caps,
            "max_prompts": s.evaluation.maxPrompts,
            "num_proposals": s.evaluation.numProposals,
            "temperature": s.evaluation.temperature,
            "thinking": s.evaluation.thinking,
            "output_dir": run.stage_dir("evaluate"),
            "gate": {},
        },
        "export": {"format": s.export.format, "output_dir": run.stage_dir("export")},
        "storage": {
            "root": run.storage_uri,
            "s3_endpoint_url": s.storage.s3.endpointUrl if s.storage.s3 else None,
        },
    }
    data = _deep_merge(s.training.recipe, from_spec)
    data = apply_overrides(data, s.training.overrides)
    return Recipe.model_validate(data)


def recipe_yaml(run: Run) -> str:
    return yaml.safe_dump(build_recipe(run).model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Storage and the recipe ConfigMap
# --------------------------------------------------------------------------------------------------


def build_pvc(run: Run) -> dict[str, Any] | None:
    """The run volume (None with S3 storage or an existing claim).

    ``Retain`` (default): no owner reference, so deleting the DraftTraining keeps the drafts and
    exports that ``status.serving`` points at; ``Delete``: owned, garbage-collected with it.
    """
    pvc = run.spec.storage.effective_pvc
    if pvc is None or pvc.existingClaim:
        return None
    meta = run.metadata(run.pvc_name, "storage")
    meta["labels"].pop("deepspec.io/run")  # shared by every run of this resource
    meta["annotations"] = {"deepspec.io/retention-policy": pvc.retentionPolicy}
    if pvc.retentionPolicy == "Retain":
        meta.pop("ownerReferences")
    spec: dict[str, Any] = {"accessModes": [pvc.accessMode], "resources": {"requests": {"storage": pvc.size}}}
    if pvc.storageClassName:
        spec["storageClassName"] = pvc.storageClassName
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def build_recipe_configmap(run: Run) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": run.metadata(run.child_name("recipe"), "recipe"),
        "data": {"recipe.yaml": recipe_yaml(run)},
    }


# --------------------------------------------------------------------------------------------------
# Pod pieces shared by every workload
# --------------------------------------------------------------------------------------------------


def _resources(user: dict[str, Any], gpus: int) -> dict[str, Any]:
    """The user's resources; default requests when none are given; GPUs as limits."""
    out = {k: dict(v) for k, v in user.items()} if user else {}
    if not out.get("requests"):
        out["requests"] = (
            {
                "cpu": str(GPU_REQUESTS_PER_GPU["cpu"] * gpus),
                "memory": f"{GPU_REQUESTS_PER_GPU['memory'] * gpus}Gi",
            }
            if gpus
            else dict(CPU_REQUESTS)
        )
    if gpus:
        out.setdefault("limits", {})["nvidia.com/gpu"] = gpus
    return out


def _volumes(run: Run) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "recipe", "configMap": {"name": run.child_name("recipe")}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": run.spec.target.shmSize}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if run.spec.storage.effective_pvc is not None:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": run.pvc_name}})
        mounts.append({"name": "data", "mountPath": DATA_MOUNT})
    else:  # no volume: a writable scratch folder for the HF cache and local copies of S3 inputs
        volumes.append({"name": "cache", "emptyDir": {}})
        mounts.append({"name": "cache", "mountPath": CACHE_MOUNT})
    return volumes, mounts


def _env(run: Run, extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
    cache = f"{DATA_MOUNT}/.cache" if run.spec.storage.effective_pvc is not None else CACHE_MOUNT
    env = [
        {"name": "DEEPSPEC_RECIPE", "value": RECIPE_PATH},
        {"name": "DEEPSPEC_RUN_ID", "value": run.run_id},
        {"name": "HF_HOME", "value": f"{cache}/huggingface"},
        {"name": "DEEPSPEC_CACHE", "value": f"{cache}/deepspec"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    env += [{"name": k, "value": v} for k, v in (extra or {}).items()]
    s3 = run.spec.storage.s3
    if s3 is not None and s3.credentialsSecretRef is not None:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append(
                {
                    "name": key,
                    "valueFrom": {"secretKeyRef": {"name": s3.credentialsSecretRef.name, "key": key}},
                }
            )
    return env


def _container(
    run: Run,
    name: str,
    command: list[str],
    gpus: int,
    resources: dict[str, Any],
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    _, mounts = _volumes(run)
    c: dict[str, Any] = {
        "name": name,
        "image": run.image,
        "imagePullPolicy": run.spec.imagePullPolicy,
        "command": command,
        "env": _env(run, env),
        "resources": _resources(resources, gpus),
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    if run.spec.storage.effective_pvc is not None:
        c["workingDir"] = DATA_MOUNT  # relative inputs resolve on the volume (deepspec.layout's rule)
    return c


POD_SECURITY = {
    "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}  # fmt: skip


def customize_pod(
    pod: dict[str, Any], pod_meta: dict[str, Any], *templates: PodTemplate
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Apply ``spec.podTemplate`` (then a component's own) to a pod spec and its metadata."""
    for t in templates:
        if t.labels:
            pod_meta["labels"] = {**t.labels, **pod_meta.get("labels", {})}  # ours win: selectors
        if t.annotations:
            pod_meta["annotations"] = {**pod_meta.get("annotations", {}), **t.annotations}
        for c in pod["containers"]:
            if t.env:
                c["env"] = [*c.get("env", []), *[dict(e) for e in t.env]]
            if t.envFrom:
                c["envFrom"] = [*c.get("envFrom", []), *[dict(e) for e in t.envFrom]]
            if t.volumeMounts:
                c["volumeMounts"] = [*c.get("volumeMounts", []), *[dict(m) for m in t.volumeMounts]]
        if t.volumes:
            pod["volumes"] = [*pod.get("volumes", []), *[dict(v) for v in t.volumes]]
        if t.imagePullSecrets:
            pod["imagePullSecrets"] = [
                *pod.get("imagePullSecrets", []),
                *[dict(x) for x in t.imagePullSecrets],
            ]
        if t.tolerations:
            pod["tolerations"] = [*pod.get("tolerations", []), *[dict(x) for x in t.tolerations]]
        if t.nodeSelector:
            pod["nodeSelector"] = {**pod.get("nodeSelector", {}), **t.nodeSelector}
        if t.affinity:
            pod["affinity"] = dict(t.affinity)
        for key in ("priorityClassName", "runtimeClassName", "schedulerName"):
            if getattr(t, key):
                pod[key] = getattr(t, key)
        pod.update({k: v for k, v in t.podSpec.items() if k != "containers"})
    return pod, pod_meta


def _pod_template(
    run: Run, component: str, containers: list[dict[str, Any]], restart: str = "Never"
) -> dict[str, Any]:
    """A PodTemplateSpec: our pod + ``spec.podTemplate`` (+ ``training.podTemplate`` for training)."""
    volumes, _ = _volumes(run)
    pod: dict[str, Any] = {
        "restartPolicy": restart,
        "containers": containers,
        "volumes": volumes,
        "securityContext": dict(POD_SECURITY),
    }
    if run.spec.serviceAccountName:
        pod["serviceAccountName"] = run.spec.serviceAccountName
    extra = [run.spec.training.podTemplate] if component == "train" else []
    pod, meta = customize_pod(pod, {"labels": run.labels(component)}, run.spec.podTemplate, *extra)
    return {"metadata": meta, "spec": pod}


def _job(run: Run, stage: str, template: dict[str, Any], **spec: Any) -> dict[str, Any]:
    name = run.child_name(stage)
    deadline_stage = {
        "summary": "evaluate",
        "reeval": "evaluate",
        "prune": "export",
        "publish": "export",
    }.get(stage, stage)
    return _drop_none(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": run.metadata(name, stage),
            "spec": {
                "backoffLimit": 2,
                "activeDeadlineSeconds": run.spec.deadlines.of(deadline_stage),
                **spec,
                "template": template,
            },
        }
    )


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# SGLang target server
# --------------------------------------------------------------------------------------------------


def server_name(run: Run) -> str:
    return run.child_name("server")


def server_url(run: Run) -> str:
    return f"http://{server_name(run)}.{run.namespace}.svc:{run.spec.target.port}/v1"


SERVER_SELECTOR_KEYS = ("app.kubernetes.io/instance", "app.kubernetes.io/component", "deepspec.io/stage-id")


def build_server_deployment(run: Run, replicas: int = 1) -> dict[str, Any]:
    """SGLang server: probes on /health_generate (startup, readiness) and /health (liveness).

    A target model given as a path under /data is read from the run volume, mounted read-only.
    """
    t = run.spec.target
    args = [
        "python3", "-m", "sglang.launch_server",
        "--model-path", t.model,
        "--served-model-name", run.served_model_name,
        "--host", "0.0.0.0",
        "--port", str(t.port),
        "--tp-size", str(t.tensorParallelSize),
        "--dp-size", str(t.gpus // t.tensorParallelSize),
        "--dtype", t.dtype,
        "--enable-metrics",
    ]  # fmt: skip
    if t.revision:
        args += ["--revision", t.revision]
    if t.trustRemoteCode:
        args.append("--trust-remote-code")
    args += t.extraArgs
    labels = run.labels("server")
    cache = (
        {"name": "model-cache", "persistentVolumeClaim": {"claimName": t.modelCacheClaim}}
        if t.modelCacheClaim
        else {"name": "model-cache", "emptyDir": {"sizeLimit": t.modelCacheSize}}
    )
    port = {"port": "http", "path": "/health_generate"}
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "model-cache", "mountPath": "/models"}]
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": t.shmSize}}, cache]
    if t.model.startswith(f"{DATA_MOUNT}/") and run.spec.storage.effective_pvc is not None:
        volumes.append(
            {"name": "data", "persistentVolumeClaim": {"claimName": run.pvc_name, "readOnly": True}}
        )
        mounts.append({"name": "data", "mountPath": DATA_MOUNT, "readOnly": True})
    container = {
        "name": "sglang",
        "image": t.image,
        "command": args,
        "env": [{"name": "HF_HOME", "value": "/models"}],
        "ports": [{"name": "http", "containerPort": t.port, "protocol": "TCP"}],
        "resources": _resources(t.resources, t.gpus),
        "volumeMounts": mounts,
        "startupProbe": {"httpGet": port, "periodSeconds": 10, "failureThreshold": 180, "timeoutSeconds": 30},
        "readinessProbe": {"httpGet": port, "periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": 30},
        "livenessProbe": {
            "httpGet": {"port": "http", "path": "/health"},
            "periodSeconds": 15,
            "failureThreshold": 4,
            "timeoutSeconds": 10,
        },
    }
    # the SGLang image runs as root: only the seccomp default profile is imposed
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
    }
    pod, meta = customize_pod(pod, {"labels": labels}, run.spec.podTemplate, t.podTemplate)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": run.metadata(server_name(run), "server"),
        "spec": {
            "replicas": replicas,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {k: labels[k] for k in SERVER_SELECTOR_KEYS}},
            "template": {"metadata": meta, "spec": pod},
        },
    }


def _service(
    run: Run, component: str, name: str, keys: tuple[str, ...], port_name: str, port: int
) -> dict[str, Any]:
    """A ClusterIP Service selecting ``component``'s pods by ``keys`` of their labels."""
    labels = run.labels(component)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": run.metadata(name, component),
        "spec": {
            "selector": {k: labels[k] for k in keys},
            "ports": [{"name": port_name, "port": port, "targetPort": port_name, "protocol": "TCP"}],
        },
    }


def _pod_monitor(
    run: Run, component: str, name: str, keys: tuple[str, ...], port_name: str, **endpoint: Any
) -> dict[str, Any]:
    """A PodMonitor scraping ``/metrics`` of ``component``'s pods every 30 s."""
    labels = run.labels(component)
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": run.metadata(name, component),
        "spec": {
            "selector": {"matchLabels": {k: labels[k] for k in keys}},
            "podMetricsEndpoints": [{"port": port_name, "path": "/metrics", "interval": "30s", **endpoint}],
        },
    }


def build_server_service(run: Run) -> dict[str, Any]:
    return _service(run, "server", server_name(run), SERVER_SELECTOR_KEYS, "http", run.spec.target.port)


def build_pod_monitor(run: Run) -> dict[str, Any]:
    """Scrape the regeneration server's SGLang /metrics (throughput, queue).

    This server decodes without a draft: its ``sglang:spec_*`` series (``spec_accept_length 0``) say
    nothing about a draft and would feed the live accepted-length alerts, so they are dropped here.
    """
    return _pod_monitor(
        run, "server", server_name(run), SERVER_SELECTOR_KEYS, "http",
        metricRelabelings=[{"sourceLabels": ["__name__"], "regex": "sglang:spec_.*", "action": "drop"}],
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Jobs: seed, regenerate, merge, features, evaluate (+ summary reader), export
# --------------------------------------------------------------------------------------------------


def needs_seed(run: Run) -> bool:
    """A seed Job runs when a relative dataset or benchmark path lives on the run volume."""
    s = run.spec
    if s.storage.effective_pvc is None:
        return False
    return not s.dataset.path.startswith(("/", "s3://")) or not s.evaluation.benchmarksDir.startswith(
        ("/", "s3://")
    )


def build_seed_job(run: Run) -> dict[str, Any]:
    """Check (and fill) the inputs a fresh volume lacks: ``deepspec operator seed``."""
    s = run.spec
    cmd = ["deepspec", "operator", "seed", "--dataset", run.resolve(s.dataset.path)]
    if s.dataset.source:
        cmd += ["--source", s.dataset.source]
    cmd += ["--benchmarks-dir", run.resolve(s.evaluation.benchmarksDir)]
    cmd += ["--benchmarks", ",".join(s.evaluation.benchmarks)]
    if s.evaluation.benchmarksSource == "fetch":
        cmd.append("--fetch-benchmarks")
    c = _container(run, "seed", cmd, 0, {})
    return _job(run, "seed", _pod_template(run, "seed", [c]), backoffLimit=1)


def build_regenerate_job(run: Run) -> dict[str, Any]:
    """Indexed Job: completion index i regenerates shard i of ``replicas``."""
    r = run.spec.regeneration
    cmd = ["deepspec", "regenerate", "-c", RECIPE_PATH, "--endpoint", server_url(run)]
    c = _container(run, "regenerate", cmd, 0, r.resources, {"DEEPSPEC_NUM_SHARDS": str(r.replicas)})
    return _job(
        run,
        "regenerate",
        _pod_template(run, "regenerate", [c]),
        completionMode="Indexed",
        completions=r.replicas,
        parallelism=r.replicas,
        backoffLimitPerIndex=2,
        backoffLimit=None,
    )


def build_merge_job(run: Run) -> dict[str, Any]:
    n = run.spec.regeneration.replicas
    cmd = ["deepspec", "regenerate", "-c", RECIPE_PATH, "--merge", "--shards", str(n)]
    return _job(run, "merge", _pod_template(run, "merge", [_container(run, "merge", cmd, 0, {})]))


def build_features_job(run: Run) -> dict[str, Any]:
    cmd = ["deepspec", "features", "-c", RECIPE_PATH]
    c = _container(run, "features", cmd, run.spec.target.gpus, run.spec.training.resources)
    return _job(run, "features", _pod_template(run, "features", [c]))


def checkpoint_dir(run: Run) -> str:
    """The training output folder (``latest`` inside names the newest checkpoint)."""
    return run.layout().checkpoints


def build_evaluate_job(run: Run) -> dict[str, Any]:
    """Evaluation; its compact JSON summary comes back through the termination message (and
    ``summary.json`` in the evaluation folder, read by :func:`build_summary_job` if the pod is gone)."""
    e = run.spec.evaluation
    cmd = [
        "deepspec", "eval", "-c", RECIPE_PATH,
        "--checkpoint", checkpoint_dir(run),
        "--termination-log", TERMINATION_LOG,
    ]  # fmt: skip
    c = _container(run, "evaluate", cmd, e.gpus, e.resources)
    return _job(run, "evaluate", _pod_template(run, "evaluate", [c]))


def build_summary_job(run: Run) -> dict[str, Any]:
    """A CPU pod that copies the evaluation's ``summary.json`` into its termination message."""
    cmd = [
        "deepspec", "operator", "read-summary", f"{run.layout().eval_dir}/summary.json",
        "--termination-log", TERMINATION_LOG,
    ]  # fmt: skip
    if run.spec.storage.s3 is not None and run.spec.storage.s3.endpointUrl:
        cmd += ["--endpoint-url", run.spec.storage.s3.endpointUrl]
    c = _container(run, "summary", cmd, 0, {})
    return _job(run, "summary", _pod_template(run, "summary", [c]), backoffLimit=1)


def build_prune_job(run: Run) -> dict[str, Any]:
    """Delete the ``<stage>-<id>`` folders of superseded runs (the current run now serves)."""
    keep = [f"{s}-{run.stage_id(s)}" for s in FOLDER_STAGES]
    cmd = ["deepspec", "operator", "prune", run.storage_uri, "--keep", ",".join(keep)]
    if run.spec.storage.s3 is not None and run.spec.storage.s3.endpointUrl:
        cmd += ["--endpoint-url", run.spec.storage.s3.endpointUrl]
    c = _container(run, "prune", cmd, 0, {})
    return _job(run, "prune", _pod_template(run, "prune", [c]), backoffLimit=1, ttlSecondsAfterFinished=86400)


def build_export_job(run: Run, checkpoint: str | None = None) -> dict[str, Any]:
    cmd = [
        "deepspec", "export", "-c", RECIPE_PATH,
        "--checkpoint", checkpoint or checkpoint_dir(run),
        "--format", run.spec.export.format,
    ]  # fmt: skip
    return _job(run, "export", _pod_template(run, "export", [_container(run, "export", cmd, 0, {})]))


# --------------------------------------------------------------------------------------------------
# Training: PyTorchJob (kubeflow.org/v1) or TrainJob (trainer.kubeflow.org/v1alpha1)
# --------------------------------------------------------------------------------------------------


def torchrun_command(run: Run, rendezvous: bool) -> list[str]:
    """``torchrun ... -m deepspec.cli train``; PyTorchJob's RANK is the node rank."""
    t = run.spec.training
    cmd = ["torchrun", f"--nnodes={t.nodes}", f"--nproc-per-node={t.gpusPerNode}"]
    if rendezvous:
        cmd += ["--node-rank=$(RANK)", "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)"]
    return [*cmd, "-m", "deepspec.cli", "train", "-c", RECIPE_PATH]


def build_pytorchjob(run: Run) -> dict[str, Any]:
    """Kubeflow PyTorchJob. ``cleanPodPolicy: Running``: when the job ends (a failed rank included),
    pods still running are deleted, so no worker keeps its GPUs; finished pods stay for their logs."""
    t = run.spec.training

    def replica(count: int) -> dict[str, Any]:
        c = _container(run, "pytorch", torchrun_command(run, t.nodes > 1), t.gpusPerNode, t.resources)
        c["ports"] = [{"name": "pytorchjob-port", "containerPort": 23456}]
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": _pod_template(run, "train", [c], "OnFailure"),
        }

    specs = {"Master": replica(1)}
    if t.nodes > 1:
        specs["Worker"] = replica(t.nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": run.metadata(run.child_name("train"), "train"),
        "spec": {
            "nprocPerNode": str(t.gpusPerNode),
            "runPolicy": {
                "backoffLimit": 2,
                "cleanPodPolicy": "Running",
                "activeDeadlineSeconds": run.spec.deadlines.trainSeconds,
            },
            "pytorchReplicaSpecs": specs,
        },
    }


#: What a Trainer v1alpha1 runtime patch may set (trainer.kubeflow.org_trainjobs schema); the rest of
#: spec.podTemplate (envFrom, runtimeClassName, priorityClassName...) belongs in the ClusterTrainingRuntime.
TRAINJOB_POD_KEYS = ("affinity", "containers", "imagePullSecrets", "nodeSelector", "securityContext",
                     "serviceAccountName", "tolerations", "volumes")  # fmt: skip
TRAINJOB_CONTAINER_KEYS = ("env", "name", "securityContext", "volumeMounts")


def build_trainjob(run: Run) -> dict[str, Any]:
    t = run.spec.training
    c = _container(run, "node", [], t.gpusPerNode, t.resources)
    _, mounts = _volumes(run)
    template = _pod_template(run, "train", [{"name": "node", "volumeMounts": mounts}], "OnFailure")
    pod = {k: v for k, v in template["spec"].items() if k in TRAINJOB_POD_KEYS}
    user_env = pod["containers"][0].get("env", [])
    pod["containers"] = [
        {k: v for k, v in pod["containers"][0].items() if k in TRAINJOB_CONTAINER_KEYS and k != "env"}
    ]
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": run.metadata(run.child_name("train"), "train"),
        "spec": {
            "activeDeadlineSeconds": run.spec.deadlines.trainSeconds,
            "runtimeRef": {
                "name": t.trainingRuntime,
                "kind": "ClusterTrainingRuntime",
                "apiGroup": "trainer.kubeflow.org",
            },
            "trainer": {
                "image": run.image,
                "command": torchrun_command(run, False)[:1],
                "args": torchrun_command(run, False)[1:],
                "numNodes": t.nodes,
                "resourcesPerNode": c["resources"],
                "env": [*c["env"], *user_env],
            },
            "runtimePatches": [
                {
                    "manager": "deepspec.io/operator",
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {
                                        "name": "node",
                                        "template": {
                                            "spec": {
                                                "template": {"metadata": template["metadata"], "spec": pod}
                                            }
                                        },
                                    }
                                ]
                            }
                        }
                    },
                }
            ],
        },
    }


def build_training(run: Run) -> dict[str, Any]:
    return build_trainjob(run) if run.training_backend == "trainjob" else build_pytorchjob(run)


# --------------------------------------------------------------------------------------------------
# Everything, for `deepspec operator render` and the golden files
# --------------------------------------------------------------------------------------------------


def build_all(run: Run, podmonitor: bool = True) -> list[dict[str, Any]]:
    """Every child object the operator may create for this run, in creation order."""
    objs: list[dict[str, Any] | None] = [
        build_pvc(run),
        build_recipe_configmap(run),
        build_seed_job(run) if needs_seed(run) else None,
        build_server_deployment(run),
        build_server_service(run),
        build_pod_monitor(run) if podmonitor else None,
        build_regenerate_job(run),
        build_merge_job(run),
        build_features_job(run) if run.spec.features.mode == "offline" else None,
        build_training(run),
        build_evaluate_job(run),
        build_export_job(run) if run.spec.export.enabled else None,
        build_publish_job(run, run.layout().export_dir, {"run": run.run_id}) if run.spec.publish else None,
        # the serving side, once a draft serves (shown here for the run's own draft)
        build_monitor_deployment(run, run.run_id, None) if run.spec.monitoring else None,
        build_monitor_service(run) if run.spec.monitoring else None,
        build_monitor_pod_monitor(run) if run.spec.monitoring and podmonitor else None,
    ]
    return [_drop_none(o) for o in objs if o is not None]


# --------------------------------------------------------------------------------------------------
# The serving side: re-evaluation of the serving draft, publication, the live monitor
# --------------------------------------------------------------------------------------------------


def reeval_id(spec: DraftTrainingSpec, checkpoint: str, nonce: str | None = None) -> str:
    """Id of the serving draft's re-evaluation: its checkpoint on this target, with these benchmarks."""
    target = _user(spec.target, "model", "revision", "dtype", "trustRemoteCode")
    return short_hash(["reeval", checkpoint, target, nonce or "",
                       _user(spec.evaluation, "benchmarksDir", "benchmarks", "caps", "maxPrompts",
                             "numProposals", "temperature", "thinking")])  # fmt: skip


def reeval_dir(run: Run) -> str:
    return f"{run.storage_uri}/reeval-{run.stage_id('reeval')}"


def build_reeval_job(run: Run, checkpoint: str) -> dict[str, Any]:
    """The serving draft evaluated on the *current* target (the candidate's), with the candidate's
    benchmarks: the fair comparison for promotion after a target update."""
    e = run.spec.evaluation
    cmd = [
        "deepspec", "eval", "-c", RECIPE_PATH,
        "--checkpoint", checkpoint,
        "--output", reeval_dir(run),
        "--termination-log", TERMINATION_LOG,
    ]  # fmt: skip
    c = _container(run, "reeval", cmd, e.gpus, e.resources)
    return _job(run, "reeval", _pod_template(run, "reeval", [c]))


def publish_dest(run: Run) -> str:
    """Where promoted drafts are published (``spec.publish.path``, default ``<run root>/published``)."""
    p = run.spec.publish
    if p is None or not p.path:
        return f"{run.storage_uri}/published"
    return run.resolve(p.path)


def publish_version(run: Run) -> str:
    return f"{run.name[:40]}-{run.run_id}"


def published_uri(run: Run) -> str:
    """The immutable version folder (what a serving resource points at: a new path rolls it out)."""
    return f"{publish_dest(run)}/versions/{publish_version(run)}"


def build_publish_job(run: Run, export_dir: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """``deepspec operator publish``: copy the export to ``versions/<version>/`` + the ``current`` pointer."""
    cmd = [
        "deepspec", "operator", "publish", export_dir, publish_dest(run),
        "--version", publish_version(run),
        "--metadata", json.dumps(metadata, sort_keys=True),
    ]  # fmt: skip
    if run.spec.storage.s3 is not None and run.spec.storage.s3.endpointUrl:
        cmd += ["--endpoint-url", run.spec.storage.s3.endpointUrl]
    c = _container(run, "publish", cmd, 0, {})
    return _job(run, "publish", _pod_template(run, "publish", [c]), backoffLimit=1)


def serving_patch(ref: Any, live: dict[str, Any], draft_path: str) -> dict[str, Any] | None:
    """The JSON merge patch pointing ``live`` (the serving resource) at ``draft_path``; None when it
    already does. A Deployment's container gets ``<argument> <path>`` (replacing ``<argument> X`` or
    ``<argument>=X``); other kinds get the string at ``fieldPath``."""
    if ref.kind == "Deployment":
        containers = copy.deepcopy(
            live.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []
        )
        if not containers:
            raise ValueError(f"Deployment {ref.name} has no containers")
        names = [c.get("name") for c in containers]
        if ref.container and ref.container not in names:
            raise ValueError(
                f"Deployment {ref.name} has no container {ref.container!r} (containers: {names})"
            )
        c = containers[names.index(ref.container) if ref.container else 0]
        key = "args" if "args" in c or "command" not in c else "command"
        words = list(c.get(key) or [])
        new = _set_flag(words, ref.argument, draft_path)
        if new == words:
            return None
        c[key] = new
        return {"spec": {"template": {"spec": {"containers": containers}}}}
    parts = ref.fieldPath.split(".")
    node: Any = live
    for part in parts:
        node = node.get(part) if isinstance(node, dict) else None
    if node == draft_path:
        return None
    patch: dict[str, Any] = {}
    cur = patch
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = draft_path
    return patch


def _set_flag(words: list[str], flag: str, value: str) -> list[str]:
    out = list(words)
    for i, w in enumerate(out):
        if w == flag and i + 1 < len(out):
            out[i + 1] = value
            return out
        if w.startswith(flag + "="):
            out[i] = f"{flag}={value}"
            return out
    return [*out, flag, value]


def monitor_name(run: Run) -> str:
    return f"{run.name[:44].rstrip('-')}-monitor"


def monitor_url(run: Run) -> str:
    assert run.spec.monitoring is not None
    return f"http://{monitor_name(run)}.{run.namespace}.svc:{run.spec.monitoring.port}/metrics"


def monitor_args(run: Run, draft_version: str, baseline: float | None) -> list[str]:
    """``deepspec monitor`` arguments for the serving draft ``draft_version`` and its baseline."""
    m = run.spec.monitoring
    assert m is not None
    cmd = ["deepspec", "monitor", "--engine", m.engine, "--mode", m.mode]
    if m.mode == "scrape":
        for url in m.metricsUrls:
            cmd += ["--metrics-url", url]
        cmd += ["--scrape-every", f"{m.intervalSeconds}s"]
    else:
        prompts = (
            m.prompts or f"{run.spec.evaluation.benchmarksDir}/{run.spec.evaluation.benchmarks[0]}.jsonl"
        )
        cmd += ["--base-url", m.baseUrl or "", "--prompts", run.resolve(prompts),
                "--num-prompts", str(m.numPrompts), "--canary-every", f"{m.intervalSeconds}s"]  # fmt: skip
    cmd += ["--served-model", m.servedModel or run.served_model_name, "--draft-version", draft_version]
    if baseline is not None:
        cmd += ["--baseline", f"{baseline:g}"]
    cmd += [
        "--tolerance", f"{m.tolerance:g}", "--duration", f"{m.durationSeconds}s",
        "--window", f"{m.windowSeconds}s", "--min-verify-steps", f"{m.minVerifySteps:g}",
        "--listen", f"0.0.0.0:{m.port}",
    ]  # fmt: skip
    return cmd


MONITOR_SELECTOR_KEYS = ("app.kubernetes.io/instance", "app.kubernetes.io/component")


def build_monitor_deployment(run: Run, draft_version: str, baseline: float | None) -> dict[str, Any]:
    """One ``deepspec monitor`` pod (CPU only) watching the serving stack; canary mode reads its
    prompts from the run volume."""
    m = run.spec.monitoring
    assert m is not None
    labels = run.labels("monitor")
    c = _container(run, "monitor", monitor_args(run, draft_version, baseline), 0, m.resources)
    c["ports"] = [{"name": "metrics", "containerPort": m.port, "protocol": "TCP"}]
    c["readinessProbe"] = {"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 30}
    template = _pod_template(run, "monitor", [c], restart="Always")
    # none of the Jobs' volumes (recipe, /dev/shm, scratch); the run volume read-only in canary mode
    # (its prompts), none in scrape mode: a ReadWriteOnce claim stays free for the Jobs
    ours = {"recipe", "dshm", "cache"} | ({"data"} if m.mode == "scrape" else set())
    template["spec"]["volumes"] = [v for v in template["spec"].get("volumes", []) if v["name"] not in ours]
    c["volumeMounts"] = [
        {**vm, "readOnly": True} if vm["name"] == "data" else vm
        for vm in c.get("volumeMounts", [])
        if vm["name"] not in ours
    ]
    if m.mode == "scrape":
        c.pop("workingDir", None)
    # no recipe here, and no cache on a volume the pod does not mount
    c["env"] = [e for e in c["env"] if e["name"] != "DEEPSPEC_RECIPE"
                and not (m.mode == "scrape" and str(e.get("value", "")).startswith(DATA_MOUNT))]  # fmt: skip
    template["metadata"]["labels"] = {**template["metadata"].get("labels", {}),
                                      **{k: labels[k] for k in MONITOR_SELECTOR_KEYS}}  # fmt: skip
    return _drop_none({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": run.metadata(monitor_name(run), "monitor"),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {k: labels[k] for k in MONITOR_SELECTOR_KEYS}},
            "template": template,
        },
    })  # fmt: skip


def build_monitor_service(run: Run) -> dict[str, Any]:
    """The operator reads the monitor's decision through this Service (``monitor_url``)."""
    assert run.spec.monitoring is not None
    m = run.spec.monitoring
    return _service(run, "monitor", monitor_name(run), MONITOR_SELECTOR_KEYS, "metrics", m.port)


def build_monitor_pod_monitor(run: Run) -> dict[str, Any]:
    """Prometheus scrapes the monitor's ``deepspec_monitor_*`` gauges (the live alerts' input)."""
    return _pod_monitor(run, "monitor", monitor_name(run), MONITOR_SELECTOR_KEYS, "metrics")
