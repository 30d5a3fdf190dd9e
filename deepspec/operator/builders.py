"""Pure builder functions: ``DraftTraining`` spec -> the plain-dict Kubernetes objects of each stage.

Nothing here talks to the API server. Every function takes a :class:`Run` (the resource's identity,
its parsed spec and the run id) and returns a dict ready to POST. All Kubernetes knowledge of the
operator lives in this file, so it is what the schema and golden-file tests exercise.

Conventions for every child:

* name = ``<resource>-<stage>-<run id>`` (run id = short hash of the spec), ``-r<N>`` for retry N;
* an owner reference to the ``DraftTraining`` (garbage-collected with it);
* labels of our own only (``app.kubernetes.io/*`` + ``deepspec.io/run``): the resource's own labels
  and annotations are never copied (GitOps tools would prune the children as their own);
* every Job runs the ``deepspec`` CLI with the recipe mounted at ``/etc/deepspec/recipe.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import yaml

from deepspec.config import Recipe, apply_overrides
from deepspec.operator.spec import GROUP, KIND, VERSION, DraftTrainingSpec

RECIPE_DIR = "/etc/deepspec"
RECIPE_PATH = f"{RECIPE_DIR}/recipe.yaml"
DATA_MOUNT = "/data"
MANAGED_BY = "deepspec-operator"
TERMINATION_LOG = "/dev/termination-log"
STAGES = ("regenerate", "merge", "features", "train", "evaluate", "export")
RUN_HASH_EXCLUDES = ("scheduling", "maxRetries", "imagePullPolicy", "serviceAccountName")


def short_hash(data: Any, n: int = 8) -> str:
    """Stable short hash of JSON-able data."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:n]


def run_id_of(spec: DraftTrainingSpec) -> str:
    """Run id: a hash of everything that changes the produced draft (a new revision = a new run)."""
    return short_hash(spec.model_dump(mode="json", exclude=set(RUN_HASH_EXCLUDES)))


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

    @classmethod
    def from_body(cls, body: dict[str, Any], **kw: Any) -> Run:
        meta = body["metadata"]
        spec = DraftTrainingSpec.model_validate(body.get("spec") or {})
        return cls(
            meta["name"], meta.get("namespace", "default"), meta.get("uid", ""), spec, run_id_of(spec), **kw
        )

    # ---- names -----------------------------------------------------------------------------------

    def child_name(self, stage: str) -> str:
        """``<name>-<stage>-<run id>[-r<N>]``, at most 52 characters (Job pod hostnames add ``-<index>``)."""
        attempt = self.attempts.get(stage, 0)
        suffix = f"-{stage}-{self.run_id}" + (f"-r{attempt}" if attempt else "")
        return f"{self.name[: 52 - len(suffix)].rstrip('-')}{suffix}"

    @property
    def pvc_name(self) -> str:
        pvc = self.spec.storage.effective_pvc
        if pvc is not None and pvc.existingClaim:
            return pvc.existingClaim
        return f"{self.name[:40]}-data-{short_hash(self.spec.storage.model_dump(mode='json'), 6)}"

    @property
    def served_model_name(self) -> str:
        return self.spec.target.servedModelName or posixpath.basename(self.spec.target.model.rstrip("/"))

    @property
    def storage_uri(self) -> str:
        """Root of this run's artefacts."""
        s3 = self.spec.storage.s3
        if s3 is not None:
            prefix = "/".join(p for p in (s3.prefix.strip("/"), self.namespace, self.name, self.run_id) if p)
            return f"s3://{s3.bucket}/{prefix}"
        return f"{DATA_MOUNT}/{self.name}/{self.run_id}"

    def resolve(self, path: str) -> str:
        """A user path: absolute or s3:// as is, relative under the volume root."""
        if path.startswith(("/", "s3://")):
            return path
        return f"{DATA_MOUNT}/{path}"

    def under_run(self, path: str) -> str:
        if path.startswith(("/", "s3://")):
            return path
        return f"{self.storage_uri}/{path}"

    # ---- metadata --------------------------------------------------------------------------------

    def labels(self, component: str) -> dict[str, str]:
        return {
            "app.kubernetes.io/name": "deepspec",
            "app.kubernetes.io/instance": self.name,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": MANAGED_BY,
            "deepspec.io/run": self.run_id,
        }

    def metadata(self, name: str, component: str) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": self.labels(component),
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": KIND,
                    "name": self.name,
                    "uid": self.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
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
    paths, then ``training.overrides``. Raises :class:`pydantic.ValidationError` / ``RecipeError``.
    """
    s = run.spec
    sampling = s.regeneration.sampling.model_dump()
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
            "sampling": sampling,
            "thinking": s.regeneration.thinking,
            "max_retries": s.regeneration.maxRetries,
            "output": run.under_run("regenerated.jsonl"),
        },
        "features": features,
        "draft": {"algorithm": s.training.algorithm},
        "training": {
            "output_dir": run.under_run("draft"),
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
            "output_dir": run.under_run("eval"),
            "gate": s.evaluation.gate.model_dump(),
        },
        "export": {"format": s.export.format, "output_dir": run.under_run("export")},
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
    """The run volume (None with S3 storage or an existing claim)."""
    pvc = run.spec.storage.effective_pvc
    if pvc is None or pvc.existingClaim:
        return None
    meta = run.metadata(run.pvc_name, "storage")
    meta["labels"].pop("deepspec.io/run")  # shared by every run of this resource
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
    out = {k: dict(v) for k, v in user.items()} if user else {}
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
    return volumes, mounts


def _env(run: Run, extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
    env = [
        {"name": "DEEPSPEC_RECIPE", "value": RECIPE_PATH},
        {"name": "DEEPSPEC_RUN_ID", "value": run.run_id},
        {"name": "HF_HOME", "value": f"{DATA_MOUNT}/.cache/huggingface"},
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
    return {
        "name": name,
        "image": run.spec.image,
        "imagePullPolicy": run.spec.imagePullPolicy,
        "command": command,
        "env": _env(run, env),
        "resources": _resources(resources, gpus),
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }


def _pod_spec(run: Run, containers: list[dict[str, Any]], restart: str = "Never") -> dict[str, Any]:
    volumes, _ = _volumes(run)
    sched = run.spec.scheduling
    pod: dict[str, Any] = {
        "restartPolicy": restart,
        "containers": containers,
        "volumes": volumes,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
    }
    if run.spec.serviceAccountName:
        pod["serviceAccountName"] = run.spec.serviceAccountName
    if sched.nodeSelector:
        pod["nodeSelector"] = dict(sched.nodeSelector)
    if sched.tolerations:
        pod["tolerations"] = [dict(t) for t in sched.tolerations]
    if sched.priorityClassName:
        pod["priorityClassName"] = sched.priorityClassName
    return pod


def _job(run: Run, stage: str, pod: dict[str, Any], **spec: Any) -> dict[str, Any]:
    name = run.child_name(stage)
    return _drop_none(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": run.metadata(name, stage),
            "spec": {
                "backoffLimit": 2,
                **spec,
                "template": {"metadata": {"labels": run.labels(stage)}, "spec": pod},
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


def build_server_deployment(run: Run, replicas: int = 1) -> dict[str, Any]:
    """SGLang server: probes on /health_generate (startup, readiness) and /health (liveness)."""
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
    container = {
        "name": "sglang",
        "image": t.image,
        "command": args,
        "env": [{"name": "HF_HOME", "value": "/models"}],
        "ports": [{"name": "http", "containerPort": t.port, "protocol": "TCP"}],
        "resources": _resources(t.resources, t.gpus),
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "model-cache", "mountPath": "/models"},
        ],
        "startupProbe": {"httpGet": port, "periodSeconds": 10, "failureThreshold": 180, "timeoutSeconds": 30},
        "readinessProbe": {"httpGet": port, "periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": 30},
        "livenessProbe": {
            "httpGet": {"port": "http", "path": "/health"},
            "periodSeconds": 15,
            "failureThreshold": 4,
            "timeoutSeconds": 10,
        },
    }
    sched = run.spec.scheduling
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": t.shmSize}}, cache],
    }
    if sched.nodeSelector:
        pod["nodeSelector"] = dict(sched.nodeSelector)
    if sched.tolerations:
        pod["tolerations"] = [dict(x) for x in sched.tolerations]
    if sched.priorityClassName:
        pod["priorityClassName"] = sched.priorityClassName
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": run.metadata(server_name(run), "server"),
        "spec": {
            "replicas": replicas,
            "strategy": {"type": "Recreate"},
            "selector": {
                "matchLabels": {
                    k: labels[k]
                    for k in ("app.kubernetes.io/instance", "app.kubernetes.io/component", "deepspec.io/run")
                }
            },
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def build_server_service(run: Run) -> dict[str, Any]:
    labels = run.labels("server")
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": run.metadata(server_name(run), "server"),
        "spec": {
            "selector": {
                k: labels[k]
                for k in ("app.kubernetes.io/instance", "app.kubernetes.io/component", "deepspec.io/run")
            },
            "ports": [
                {"name": "http", "port": run.spec.target.port, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


def build_pod_monitor(run: Run) -> dict[str, Any]:
    """Scrape SGLang's /metrics (sglang:spec_accept_length, sglang:spec_accept_rate...)."""
    labels = run.labels("server")
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": run.metadata(server_name(run), "server"),
        "spec": {
            "selector": {
                "matchLabels": {
                    k: labels[k] for k in ("app.kubernetes.io/instance", "app.kubernetes.io/component")
                }
            },
            "podMetricsEndpoints": [{"port": "http", "path": "/metrics", "interval": "30s"}],
        },
    }


# --------------------------------------------------------------------------------------------------
# Jobs: regenerate, merge, features, evaluate, export
# --------------------------------------------------------------------------------------------------


def build_regenerate_job(run: Run) -> dict[str, Any]:
    """Indexed Job: completion index i regenerates shard i of ``replicas``."""
    r = run.spec.regeneration
    cmd = ["deepspec", "regenerate", "-c", RECIPE_PATH, "--endpoint", server_url(run)]
    c = _container(run, "regenerate", cmd, 0, r.resources, {"DEEPSPEC_NUM_SHARDS": str(r.replicas)})
    return _job(
        run,
        "regenerate",
        _pod_spec(run, [c]),
        completionMode="Indexed",
        completions=r.replicas,
        parallelism=r.replicas,
        backoffLimitPerIndex=2,
        backoffLimit=None,
    )


def build_merge_job(run: Run) -> dict[str, Any]:
    n = run.spec.regeneration.replicas
    cmd = ["deepspec", "regenerate", "-c", RECIPE_PATH, "--merge", "--shards", str(n)]
    return _job(run, "merge", _pod_spec(run, [_container(run, "merge", cmd, 0, {})]))


def build_features_job(run: Run) -> dict[str, Any]:
    cmd = ["deepspec", "features", "-c", RECIPE_PATH]
    c = _container(run, "features", cmd, run.spec.target.gpus, run.spec.training.resources)
    return _job(run, "features", _pod_spec(run, [c]))


def checkpoint_dir(run: Run) -> str:
    return run.under_run("draft")


def build_evaluate_job(run: Run) -> dict[str, Any]:
    """Evaluation; its compact JSON summary comes back through the termination message."""
    e = run.spec.evaluation
    cmd = [
        "deepspec",
        "eval",
        "-c",
        RECIPE_PATH,
        "--checkpoint",
        checkpoint_dir(run),
        "--termination-log",
        TERMINATION_LOG,
    ]
    return _job(run, "evaluate", _pod_spec(run, [_container(run, "evaluate", cmd, e.gpus, e.resources)]))


def build_export_job(run: Run, checkpoint: str | None = None) -> dict[str, Any]:
    cmd = [
        "deepspec", "export", "-c", RECIPE_PATH,
        "--checkpoint", checkpoint or checkpoint_dir(run),
        "--format", run.spec.export.format,
    ]  # fmt: skip
    return _job(run, "export", _pod_spec(run, [_container(run, "export", cmd, 0, {})]))


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
    t = run.spec.training

    def replica(count: int) -> dict[str, Any]:
        c = _container(run, "pytorch", torchrun_command(run, t.nodes > 1), t.gpusPerNode, t.resources)
        c["ports"] = [{"name": "pytorchjob-port", "containerPort": 23456}]
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": {
                "metadata": {"labels": run.labels("train")},
                "spec": _pod_spec(run, [c], "OnFailure"),
            },
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
            "runPolicy": {"backoffLimit": 2, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": specs,
        },
    }


def build_trainjob(run: Run) -> dict[str, Any]:
    t = run.spec.training
    c = _container(run, "node", [], t.gpusPerNode, t.resources)
    volumes, mounts = _volumes(run)
    pod = _pod_spec(run, [{"name": "node", "volumeMounts": mounts}], "OnFailure")
    pod.pop("restartPolicy")
    pod["volumes"] = volumes
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": run.metadata(run.child_name("train"), "train"),
        "spec": {
            "runtimeRef": {
                "name": t.trainingRuntime,
                "kind": "ClusterTrainingRuntime",
                "apiGroup": "trainer.kubeflow.org",
            },
            "trainer": {
                "image": run.spec.image,
                "command": torchrun_command(run, False)[:1],
                "args": torchrun_command(run, False)[1:],
                "numNodes": t.nodes,
                "resourcesPerNode": c["resources"],
                "env": c["env"],
            },
            "runtimePatches": [
                {
                    "manager": "deepspec.io/operator",
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {"name": "node", "template": {"spec": {"template": {"spec": pod}}}}
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
        build_server_deployment(run),
        build_server_service(run),
        build_pod_monitor(run) if podmonitor else None,
        build_regenerate_job(run),
        build_merge_job(run),
        build_features_job(run) if run.spec.features.mode == "offline" else None,
        build_training(run),
        build_evaluate_job(run),
        build_export_job(run) if run.spec.export.enabled else None,
    ]
    return [_drop_none(o) for o in objs if o is not None]
