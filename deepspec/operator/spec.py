"""The ``DraftTraining`` custom resource: spec and status models.

The spec is *composed from the recipe models* in :mod:`deepspec.config`:

* whole recipe sections are embedded through :func:`camel_section` (``regeneration.sampling`` is a
  :class:`~deepspec.config.SamplingConfig`, ``evaluation.gate`` a :class:`~deepspec.config.GateConfig`,
  ``features`` a :class:`~deepspec.config.FeaturesConfig`): same fields, bounds and descriptions, but
  camelCase keys in the resource (``topP``, ``minAcceptLength``) as Kubernetes API conventions want;
  the recipe YAML keeps its snake_case names (``model_dump()`` gives field names);
* single operator-facing fields borrow the recipe field's type constraints, default and description
  through :func:`recipe_field` (``target.servedModelName`` *is* ``TargetConfig.served_model_name``);
* operator-only fields (images, GPUs, storage, scheduling) are defined here in Kubernetes camelCase.

Cross-field rules exist twice on purpose: as CEL ``x-kubernetes-validations`` (enforced by the API
server, declared with :func:`cel`) and as pydantic validators (enforced by the operator). Each CEL rule
sits next to its Python twin; the tests evaluate the CEL rules with a real CEL runtime after
structural defaulting (object fields default to ``{}`` so a rule may select ``self.gate`` even when the
user left ``gate`` out). Rules only select fields that are required or defaulted, or guard with
``has()``: on the API server, selecting an absent field is an evaluation error that rejects the object.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from deepspec.config import (
    DataConfig,
    EvaluationConfig,
    ExportConfig,
    FeaturesConfig,
    GateConfig,
    RegenerationConfig,
    SamplingConfig,
    StorageConfig,
    TargetConfig,
    TrainingConfig,
)

GROUP = "deepspec.io"
VERSION = "v1alpha1"
KIND = "DraftTraining"
PLURAL = "drafttrainings"
SINGULAR = "drafttraining"
SHORT_NAMES = ["dt"]

DEFAULT_IMAGE = "ghcr.io/deepspec/deepspec:0.1.0"
#: The operator's deployment sets this to its own image; Jobs use it when ``spec.image`` is unset.
IMAGE_ENV = "DEEPSPEC_JOB_IMAGE"
DEFAULT_SGLANG_IMAGE = "lmsysorg/sglang:v0.5.4-cu126"
RETRY_ANNOTATION = "deepspec.io/retry"
RETRAIN_ANNOTATION = "deepspec.io/retrain"


def recipe_field(model: type[BaseModel], name: str, **changes: Any) -> Any:
    """A copy of ``model``'s field ``name`` (constraints, default, description), optionally changed."""
    info: FieldInfo = copy.deepcopy(model.model_fields[name])
    for key, value in changes.items():
        setattr(info, key, value)
    return info


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One CEL rule as it appears under ``x-kubernetes-validations``."""
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


class SpecModel(BaseModel):
    """Base of the spec models: unknown keys are errors (the API server prunes them anyway)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


CAMEL = ConfigDict(alias_generator=to_camel, extra="forbid", validate_assignment=True)


def camel_section(model: type[BaseModel]) -> Any:
    """``model`` with camelCase keys: the resource says ``topP``, the recipe built from it ``top_p``."""
    return type(model.__name__.replace("Config", "Spec"), (model,), {
        "model_config": CAMEL, "__doc__": model.__doc__, "__module__": __name__,
    })  # fmt: skip


SamplingSpec = camel_section(SamplingConfig)
GateSpec = camel_section(GateConfig)


class PodTemplate(SpecModel):
    """Additions to the pods the operator creates (server, Jobs, training workers).

    Lists are appended to the operator's own entries, maps merged over them; ``podSpec`` is any further
    core PodSpec field (e.g. ``hostNetwork``, ``dnsConfig``), set as given.
    """

    labels: dict[str, str] = Field(default_factory=dict, description="Pod labels (queue names...).")
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Pod annotations (mesh opt-outs...)."
    )
    imagePullSecrets: list[dict[str, Any]] = Field(default_factory=list, description="LocalObjectReferences.")
    env: list[dict[str, Any]] = Field(
        default_factory=list, description="EnvVars of every container (HF_TOKEN...)."
    )
    envFrom: list[dict[str, Any]] = Field(
        default_factory=list, description="EnvFromSources of every container."
    )
    volumes: list[dict[str, Any]] = Field(default_factory=list, description="Extra pod volumes.")
    volumeMounts: list[dict[str, Any]] = Field(
        default_factory=list, description="Mounts of the extra volumes."
    )
    nodeSelector: dict[str, str] = Field(default_factory=dict, description="Node selector.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Core Toleration objects.")
    affinity: dict[str, Any] = Field(default_factory=dict, description="Core Affinity.")
    priorityClassName: str | None = Field(None, description="Priority class.")
    runtimeClassName: str | None = Field(None, description="Runtime class (e.g. nvidia).")
    schedulerName: str | None = Field(None, description="Scheduler (e.g. a batch scheduler).")
    podSpec: dict[str, Any] = Field(default_factory=dict, description="Other PodSpec fields, set as given.")


# --------------------------------------------------------------------------------------------------
# spec.target: the SGLang target server
# --------------------------------------------------------------------------------------------------


class TargetSpec(SpecModel):
    """The frozen target model and the SGLang server the operator runs for regeneration."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.gpus % self.tensorParallelSize == 0",
                    "target.gpus must be a multiple of target.tensorParallelSize (data-parallel replicas)",
                    ".gpus",
                )
            ]
        }
    )

    model: str = recipe_field(
        TargetConfig,
        "model",
        default=PydanticUndefined,
        description=(
            "Target model: HF hub id (the server downloads it into the model cache) or an absolute path "
            "under /data (the run volume, mounted read-only in the server too)."
        ),
    )
    revision: str | None = recipe_field(TargetConfig, "revision")
    servedModelName: str | None = recipe_field(TargetConfig, "served_model_name")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = recipe_field(TargetConfig, "dtype")
    trustRemoteCode: bool = recipe_field(TargetConfig, "trust_remote_code")
    image: str = Field(DEFAULT_SGLANG_IMAGE, description="SGLang server image (pinned tag).")
    tensorParallelSize: int = Field(1, ge=1, le=64, description="SGLang --tp-size.")
    gpus: int = Field(
        1, ge=1, le=64, description="GPUs per server pod (gpus / tensorParallelSize = --dp-size)."
    )
    port: int = Field(30000, ge=1024, le=65535, description="Server port.")
    shmSize: str = Field("16Gi", description="Size of the /dev/shm memory volume.")
    modelCacheClaim: str | None = Field(
        None, description="Existing PVC holding the HF cache (default: an emptyDir of modelCacheSize)."
    )
    modelCacheSize: str = Field("200Gi", description="emptyDir size limit of the model cache.")
    extraArgs: list[str] = Field(default_factory=list, description="Extra sglang.launch_server flags.")
    resources: dict[str, Any] = Field(
        default_factory=dict, description="Container resources (core ResourceRequirements); GPUs are added."
    )
    podTemplate: PodTemplate = Field(
        default_factory=PodTemplate, description="Server-only pod additions (over spec.podTemplate)."
    )

    @model_validator(mode="after")
    def _gpus_multiple_of_tp(self) -> TargetSpec:
        if self.gpus % self.tensorParallelSize:
            raise ValueError(
                "target.gpus must be a multiple of target.tensorParallelSize (data-parallel replicas)"
            )
        return self


# --------------------------------------------------------------------------------------------------
# spec.dataset, spec.regeneration
# --------------------------------------------------------------------------------------------------


class DatasetSpec(SpecModel):
    """Input conversations (regenerated by the target)."""

    path: str = recipe_field(
        DataConfig,
        "path",
        default=PydanticUndefined,
        description=(
            "JSONL conversations: a path relative to the run volume's root (/data), an absolute path, or s3://."
        ),
    )
    source: str | None = Field(
        None,
        description=(
            "Where to copy a relative `path` from when the run volume lacks it (seed Job): https://..., "
            "s3://bucket/key or hf://datasets/<repo>/<file>. Unset: the file must already be on the volume."
        ),
    )
    format: Literal["auto", "openai", "sharegpt", "turns"] = recipe_field(DataConfig, "format")
    maxSamples: int | None = recipe_field(DataConfig, "max_samples")
    maxLength: int = recipe_field(DataConfig, "max_length")


class RegenerationSpec(SpecModel):
    """Regeneration fan-out: an Indexed Job, one shard per completion index."""

    replicas: int = Field(1, ge=1, le=512, description="Shards = Job completions = parallel pods.")
    concurrency: int = recipe_field(RegenerationConfig, "concurrency")
    sampling: SamplingSpec = Field(  # type: ignore[valid-type]
        default_factory=SamplingSpec, description="Recipe sampling (SamplingConfig, camelCase keys)."
    )
    thinking: bool | None = recipe_field(RegenerationConfig, "thinking")
    maxRetries: int = recipe_field(RegenerationConfig, "max_retries")
    resources: dict[str, Any] = Field(default_factory=dict, description="Container resources of a shard pod.")


# --------------------------------------------------------------------------------------------------
# spec.features, spec.training
# --------------------------------------------------------------------------------------------------


class FeaturesSpec(FeaturesConfig):
    """Recipe FeaturesConfig, camelCase keys. A relative cachePath resolves under the run's storage."""

    model_config = ConfigDict(
        **CAMEL,
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.mode != 'offline' || (has(self.cachePath) && self.cachePath != '')",
                    "features.cachePath is required when features.mode is 'offline'",
                    ".cachePath",
                )
            ]
        },
    )

    @model_validator(mode="after")
    def _offline_needs_cache(self) -> FeaturesSpec:
        if self.mode == "offline" and not self.cache_path:
            raise ValueError("features.cachePath is required when features.mode is 'offline'")
        return self


class TrainingSpec(SpecModel):
    """Distributed training under torchrun (Kubeflow PyTorchJob or Trainer TrainJob)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.nodes * self.gpusPerNode > 0",
                    "training.nodes * training.gpusPerNode must be > 0",
                    ".gpusPerNode",
                )
            ]
        }
    )

    algorithm: Literal["eagle3", "dflash", "dspark"] = Field("eagle3", description="Draft algorithm.")
    backend: Literal["auto", "pytorchjob", "trainjob"] = Field(
        "auto", description="'auto' = PyTorchJob when kubeflow.org/v1 is served, else TrainJob."
    )
    nodes: int = Field(1, ge=1, le=256, description="Nodes (PyTorchJob: 1 Master + nodes-1 Workers).")
    gpusPerNode: int = Field(8, ge=0, le=16, description="GPUs per node = torchrun --nproc-per-node.")
    parallelism: Literal["ddp", "fsdp2"] = recipe_field(TrainingConfig, "parallelism")
    epochs: float = recipe_field(TrainingConfig, "epochs")
    maxSteps: int | None = recipe_field(TrainingConfig, "max_steps")
    recipe: dict[str, Any] = Field(
        default_factory=dict,
        description="Inline recipe fragment (any recipe keys, e.g. {draft: {ttt_steps: 5}}) merged under the spec.",
    )
    overrides: list[str] = Field(
        default_factory=list, description="Dotted recipe overrides applied last, e.g. 'training.lr=3e-4'."
    )
    trainingRuntime: str = Field(
        "torch-distributed", description="TrainJob: name of the ClusterTrainingRuntime to reference."
    )
    resources: dict[str, Any] = Field(default_factory=dict, description="Container resources per node.")
    podTemplate: PodTemplate = Field(
        default_factory=PodTemplate, description="Training-only pod additions (over spec.podTemplate)."
    )

    @model_validator(mode="after")
    def _some_gpus(self) -> TrainingSpec:
        if self.nodes * self.gpusPerNode <= 0:
            raise ValueError("training.nodes * training.gpusPerNode must be > 0")
        return self


# --------------------------------------------------------------------------------------------------
# spec.evaluation, spec.export
# --------------------------------------------------------------------------------------------------


class EvaluationSpec(SpecModel):
    """Accepted-length evaluation and the gate a new draft must pass to become the serving one."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.gate.minAcceptLength) || self.gate.minAcceptLength <= double(self.numProposals) + 1.0",
                    "evaluation.gate.minAcceptLength cannot exceed evaluation.numProposals + 1",
                    ".gate.minAcceptLength",
                ),
                cel(
                    "!has(self.gate.maxDrop) || self.gate.maxDrop < double(self.numProposals)",
                    "evaluation.gate.maxDrop must be below evaluation.numProposals",
                    ".gate.maxDrop",
                ),
            ]
        }
    )

    benchmarksDir: str = recipe_field(
        EvaluationConfig,
        "benchmarks_dir",
        default="benchmarks",
        description=(
            "Directory of {turns} JSONL benchmark files, relative to the run volume's root (/data) or absolute."
        ),
    )
    benchmarks: list[str] = Field(
        default_factory=lambda: ["gsm8k", "mt-bench"], min_length=1, description="Benchmark file stems."
    )
    caps: dict[str, int] = recipe_field(EvaluationConfig, "caps")
    maxPrompts: int | None = recipe_field(EvaluationConfig, "max_prompts")
    numProposals: int = recipe_field(EvaluationConfig, "num_proposals")
    temperature: float = recipe_field(EvaluationConfig, "temperature")
    thinking: bool = recipe_field(EvaluationConfig, "thinking")
    benchmarksSource: Literal["volume", "fetch"] = Field(
        "volume",
        description=(
            "'fetch': the seed Job builds missing benchmark files with `deepspec benchmarks fetch` (needs "
            "network); 'volume': they must already be in benchmarksDir."
        ),
    )
    gate: GateSpec = Field(  # type: ignore[valid-type]
        default_factory=GateSpec,
        description="Acceptance gate (GateConfig, camelCase keys), applied by the operator.",
    )
    baselineAcceptLength: float | None = Field(
        None,
        ge=1.0,
        description="Baseline macro accepted length before any draft serves (gate max_drop, alerts).",
    )
    gpus: int = Field(1, ge=1, le=16, description="GPUs of the evaluation pod.")
    resources: dict[str, Any] = Field(default_factory=dict, description="Container resources.")

    @model_validator(mode="after")
    def _gate_sane(self) -> EvaluationSpec:
        g = self.gate
        if g.min_accept_length is not None and g.min_accept_length > self.numProposals + 1:
            raise ValueError("evaluation.gate.minAcceptLength cannot exceed evaluation.numProposals + 1")
        if g.max_drop is not None and g.max_drop >= self.numProposals:
            raise ValueError("evaluation.gate.maxDrop must be below evaluation.numProposals")
        return self


class ExportSpec(SpecModel):
    """Serving-engine checkpoint written after the gate."""

    enabled: bool = Field(True, description="Run the export Job.")
    format: Literal["sglang", "vllm"] = recipe_field(ExportConfig, "format")


# --------------------------------------------------------------------------------------------------
# spec.storage, spec.scheduling
# --------------------------------------------------------------------------------------------------


class PVCStorage(SpecModel):
    """A PersistentVolumeClaim mounted at /data in every Job pod."""

    size: str = Field(
        "500Gi", description="Requested size; raising it later expands the claim (storage class permitting)."
    )
    storageClassName: str | None = Field(None, description="Storage class (cluster default when unset).")
    accessMode: Literal["ReadWriteOnce", "ReadWriteMany"] = Field(
        "ReadWriteOnce",
        description="ReadWriteOnce works on most default storage classes; multi-node training needs ReadWriteMany.",
    )
    existingClaim: str | None = Field(None, description="Use this PVC instead of creating one.")
    retentionPolicy: Literal["Retain", "Delete"] = Field(
        "Retain",
        description=(
            "On deletion of the DraftTraining: 'Retain' keeps the claim with its drafts and exports "
            "(status.serving points there), 'Delete' lets the garbage collector remove it."
        ),
    )


class SecretRef(SpecModel):
    """A Secret in the resource's namespace."""

    name: str = Field(..., min_length=1, description="Secret name.")


class S3Storage(SpecModel):
    """An S3 prefix. Credentials: the Secret's AWS_* keys, else the pod's service account (IRSA...)."""

    bucket: str = Field(..., min_length=1, description="Bucket name.")
    prefix: str = Field("deepspec", description="Key prefix under the bucket.")
    endpointUrl: str | None = recipe_field(StorageConfig, "s3_endpoint_url")
    credentialsSecretRef: SecretRef | None = Field(
        None,
        description=(
            "Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. Unset: boto3's default chain, e.g. "
            "IRSA / EKS Pod Identity / Workload Identity through spec.serviceAccountName."
        ),
    )


class StorageSpec(SpecModel):
    """Artefacts live under /data/<resource>/<stage>-<id>/ (PVC) or s3://bucket/prefix/<ns>/<resource>/..."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!(has(self.pvc) && has(self.s3))", "storage: set either pvc or s3, not both", ".s3"),
            ]
        }
    )

    pvc: PVCStorage | None = Field(None, description="PVC storage (the default when neither is set).")
    s3: S3Storage | None = Field(None, description="S3 storage.")
    pruneSuperseded: bool = Field(
        True,
        description=(
            "After a run succeeds, a Job deletes the stage folders no current stage uses (older runs' "
            "data, checkpoints, reports, exports). false: keep every run's folders."
        ),
    )

    @model_validator(mode="after")
    def _one_backend(self) -> StorageSpec:
        if self.pvc is not None and self.s3 is not None:
            raise ValueError("storage: set either pvc or s3, not both")
        return self

    @property
    def effective_pvc(self) -> PVCStorage | None:
        """The PVC settings in force (defaults when no backend is set)."""
        if self.s3 is not None:
            return None
        return self.pvc or PVCStorage()


class DeadlinesSpec(SpecModel):
    """Longest time each stage may take (pods Pending included) before the resource is Stalled."""

    serverReadySeconds: int = Field(3600, ge=60, description="SGLang server: created to ready.")
    seedSeconds: int = Field(7200, ge=60)
    regenerateSeconds: int = Field(2 * 86400, ge=60)
    mergeSeconds: int = Field(7200, ge=60)
    featuresSeconds: int = Field(2 * 86400, ge=60)
    trainSeconds: int = Field(14 * 86400, ge=60)
    evaluateSeconds: int = Field(86400, ge=60)
    exportSeconds: int = Field(7200, ge=60)

    def of(self, stage: str) -> int:
        return int(getattr(self, "serverReadySeconds" if stage == "server" else f"{stage}Seconds"))


# --------------------------------------------------------------------------------------------------
# spec.monitoring, spec.retrain, spec.publish: the serving side (docs/monitoring.md, "Operator")
# --------------------------------------------------------------------------------------------------


class MonitoringSpec(SpecModel):
    """A live monitor (``deepspec monitor``) of the serving stack, deployed once a draft serves.

    The operator reads its decision from the monitor's ``/metrics`` (``deepspec_monitor_state``...)
    into ``status.drift``; Prometheus scrapes the same endpoint through a PodMonitor.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.mode != 'scrape' || (has(self.metricsUrls) && size(self.metricsUrls) > 0)",
                    "monitoring.metricsUrls is required in scrape mode",
                    ".metricsUrls",
                ),
                cel(
                    "self.mode != 'canary' || (has(self.baseUrl) && self.baseUrl != '')",
                    "monitoring.baseUrl is required in canary mode",
                    ".baseUrl",
                ),
            ]
        }
    )

    mode: Literal["scrape", "canary"] = Field(
        "scrape", description="scrape: read the engine's /metrics; canary: send fixed prompts (OpenAI API)."
    )
    engine: Literal["sglang", "vllm"] = Field("sglang", description="The serving engine.")
    metricsUrls: list[str] = Field(
        default_factory=list, description="Scrape mode: the engine's /metrics URLs (one per replica)."
    )
    baseUrl: str | None = Field(None, description="Canary mode: OpenAI-compatible base URL (.../v1).")
    prompts: str | None = Field(
        None,
        description=(
            "Canary mode: {turns} JSONL prompts, relative to the run volume (default: the first evaluation "
            "benchmark, so the canary is comparable with the gate's accepted length)."
        ),
    )
    numPrompts: int = Field(16, ge=1, le=1000, description="Canary prompts per run.")
    servedModel: str | None = Field(None, description="Served model name (default: target.servedModelName).")
    tolerance: float = Field(0.1, gt=0.0, lt=1.0, description="Relative drop below the baseline that counts.")
    durationSeconds: int = Field(900, ge=0, description="How long the drop must last to be drift.")
    windowSeconds: int = Field(600, ge=1, description="Measurement window.")
    intervalSeconds: int = Field(30, ge=1, description="Seconds between measurements (scrape or canary).")
    minVerifySteps: float = Field(
        200.0, ge=1.0, description="Verification steps needed in the window for any decision (low traffic)."
    )
    port: int = Field(9400, ge=1024, le=65535, description="Port of the monitor's /metrics.")
    resources: dict[str, Any] = Field(default_factory=dict, description="Container resources.")

    @model_validator(mode="after")
    def _source_given(self) -> MonitoringSpec:
        if self.mode == "scrape" and not self.metricsUrls:
            raise ValueError("monitoring.metricsUrls is required in scrape mode")
        if self.mode == "canary" and not self.baseUrl:
            raise ValueError("monitoring.baseUrl is required in canary mode")
        return self


class RetrainSpec(SpecModel):
    """When a new run starts by itself, and when its draft replaces the serving one."""

    policy: Literal["manual", "onTargetUpdate", "onDrift"] = Field(
        "onTargetUpdate",
        description=(
            "manual: a target revision change waits for the deepspec.io/retrain annotation; onTargetUpdate: "
            "a revision change starts a run; onDrift: that, and live drift reported by the monitor."
        ),
    )
    minGain: float = Field(
        0.0,
        ge=0.0,
        description=(
            "After a target change, the new draft must beat the serving draft re-evaluated on the new target "
            "by more than this (accepted length) to be promoted."
        ),
    )


class ServingRef(SpecModel):
    """A serving resource whose draft path the operator sets to the promoted draft."""

    apiVersion: str = Field("apps/v1", description="API version of the serving resource.")
    kind: str = Field("Deployment", description="Kind (Deployment: an SGLang/vLLM container's arguments).")
    name: str = Field(..., min_length=1, description="Name, in the DraftTraining's namespace.")
    container: str | None = Field(
        None, description="Deployment: the container to update (default: the first one)."
    )
    argument: str = Field(
        "--speculative-draft-model-path",
        description="Deployment: the draft path flag (vLLM: put it in a --speculative-config JSON yourself).",
    )
    fieldPath: str | None = Field(
        None,
        description=(
            "Other kinds: dotted path of the string field to set, e.g. a KServe LLMInferenceService's draft "
            "model URI field."
        ),
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.kind == 'Deployment' || has(self.fieldPath)",
                    "publish.servingRef.fieldPath is required for kinds other than Deployment",
                    ".fieldPath",
                )
            ]
        }
    )

    @model_validator(mode="after")
    def _field_for_other_kinds(self) -> ServingRef:
        if self.kind != "Deployment" and not self.fieldPath:
            raise ValueError("publish.servingRef.fieldPath is required for kinds other than Deployment")
        return self


class PublishSpec(SpecModel):
    """GitOps publication of each promoted draft: ``versions/<version>/`` + a ``current`` pointer."""

    path: str | None = Field(
        None,
        description=(
            "Destination: relative to the run volume, absolute, or s3:// (default: <run root>/published)."
        ),
    )
    servingRef: ServingRef | None = Field(
        None, description="Serving resource updated to the published version (no manual step)."
    )


# --------------------------------------------------------------------------------------------------
# spec
# --------------------------------------------------------------------------------------------------


class DraftTrainingSpec(SpecModel):
    """Desired state: a draft model for ``target``, trained, evaluated and exported."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.training.nodes == 1 || has(self.storage.s3) || "
                    "(has(self.storage.pvc) && has(self.storage.pvc.accessMode) && "
                    "self.storage.pvc.accessMode == 'ReadWriteMany')",
                    "training.nodes > 1 needs storage.pvc.accessMode ReadWriteMany or storage.s3",
                    ".storage",
                )
            ]
        }
    )

    target: TargetSpec
    dataset: DatasetSpec
    regeneration: RegenerationSpec = Field(default_factory=RegenerationSpec)
    features: FeaturesSpec = Field(default_factory=FeaturesSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    podTemplate: PodTemplate = Field(
        default_factory=PodTemplate, description="Additions to every pod (server, Jobs, training)."
    )
    deadlines: DeadlinesSpec = Field(default_factory=DeadlinesSpec)
    suspend: bool = Field(
        False, description="Suspend: running Jobs are suspended (pods removed), the server scaled to zero."
    )
    image: str | None = Field(
        None, description="deepspec image of every Job (default: the operator's own image)."
    )
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent")
    serviceAccountName: str | None = Field(
        None, description="Service account of the workload pods (S3 via IRSA / Workload Identity)."
    )
    maxRetries: int = Field(2, ge=0, le=10, description="Re-creations of a failed stage before Stalled.")
    monitoring: MonitoringSpec | None = Field(
        None, description="Live acceptance monitor of the serving stack (status.drift)."
    )
    retrain: RetrainSpec = Field(default_factory=RetrainSpec)
    publish: PublishSpec | None = Field(None, description="Publish promoted drafts (and update serving).")

    @model_validator(mode="after")
    def _multi_node_storage(self) -> DraftTrainingSpec:
        pvc = self.storage.effective_pvc
        if self.training.nodes > 1 and pvc is not None and pvc.accessMode != "ReadWriteMany":
            raise ValueError("training.nodes > 1 needs storage.pvc.accessMode ReadWriteMany or storage.s3")
        return self


# --------------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------------


class Condition(BaseModel):
    """A standard Kubernetes condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    lastTransitionTime: str | None = None
    observedGeneration: int | None = None


class BenchmarkResult(BaseModel):
    """Per-benchmark figures from the evaluation summary."""

    tau: float = Field(..., description="Accepted length (tokens per verification round).")
    acceptance_ratio: float | None = None
    n: int | None = None


class Results(BaseModel):
    """The latest evaluation (of whichever run produced it)."""

    runId: str | None = None
    evaluateId: str | None = None
    macroAcceptLength: float | None = None
    benchmarks: dict[str, BenchmarkResult] = Field(default_factory=dict)
    checkpoint: str | None = None
    targetRevision: str | None = None
    gatePassed: bool | None = None
    evaluatedAt: str | None = None


class Serving(BaseModel):
    """The draft that passed the gate and is the one to serve."""

    runId: str | None = None
    checkpoint: str | None = None
    exportUri: str | None = None
    targetRevision: str | None = None
    macroAcceptLength: float | None = None
    since: str | None = None
    retrainNonce: str | None = None


class Drift(BaseModel):
    """The live monitor's last decision (``deepspec.monitor.drift``), read from its /metrics."""

    state: str | None = None
    drift: bool = False
    observed: float | None = None
    baseline: float | None = None
    since: str | None = Field(None, description="Start of the current below-baseline stretch.")
    draftVersion: str | None = None
    reason: str | None = None
    checkedAt: str | None = None


class Promotion(BaseModel):
    """The last promotion decision: the new draft against the serving one, both on the new target."""

    runId: str | None = None
    promoted: bool | None = None
    candidateAcceptLength: float | None = None
    servingAcceptLength: float | None = Field(
        None, description="Serving draft re-evaluated on the new target."
    )
    reason: str | None = None


class Publication(BaseModel):
    """Where the serving draft was published and which serving resource points at it."""

    version: str | None = None
    uri: str | None = None
    servingRef: str | None = None


class RunStatus(BaseModel):
    """The run in progress (or the last one). Each stage has its own id: a hash of its own inputs."""

    id: str | None = None
    targetRevision: str | None = None
    storageUri: str | None = None
    startedAt: str | None = None
    stageIds: dict[str, str] = Field(default_factory=dict, description="stage -> id of its inputs")
    attempts: dict[str, int] = Field(default_factory=dict)
    retryBudgetFrom: dict[str, int] = Field(
        default_factory=dict, description="stage -> attempt from which maxRetries counts again (retry)"
    )
    children: dict[str, str] = Field(default_factory=dict, description="stage -> child object name")
    completed: dict[str, str] = Field(
        default_factory=dict, description="stage -> stage id it completed with (survives Job deletion)"
    )
    stageStartedAt: dict[str, str] = Field(default_factory=dict, description="stage -> start (deadlines)")
    retryRequest: str | None = Field(None, description="Last deepspec.io/retry annotation value handled.")
    supersededRemoved: bool = Field(
        False, description="The children of earlier runs have been deleted (done once per run)."
    )
    trainingBackend: str | None = None


class DraftTrainingStatus(BaseModel):
    """Observed state, written by the operator only."""

    phase: str | None = None
    observedGeneration: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    run: RunStatus = Field(default_factory=RunStatus)
    results: Results = Field(default_factory=Results)
    serving: Serving = Field(default_factory=Serving)
    checkpointUri: str | None = None
    trainedTargetRevision: str | None = None
    message: str | None = None
    drift: Drift | None = None
    promotion: Promotion = Field(default_factory=Promotion)
    publication: Publication = Field(default_factory=Publication)
    retrainNonce: str | None = Field(None, description="Set by a drift-triggered retrain (new run identity).")
    retrainRequest: str | None = Field(None, description="Last deepspec.io/retrain annotation value handled.")
