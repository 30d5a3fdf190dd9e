"""Every child object the builders produce validates strictly; golden files pin one example.

Core kinds: kubernetes-validate (strict, Kubernetes 1.37). PyTorchJob / TrainJob / PodMonitor:
jsonschema against ../shared/k8s-schemas/. Regenerate the goldens with
``DEEPSPEC_UPDATE_GOLDENS=1 pytest tests/operator/test_children.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from operator_harness import EXAMPLES, SCHEMAS, load_example

from deepspec.config import Recipe
from deepspec.operator.builders import Run, build_all, build_recipe

K8S_VERSION = "1.37.0"
GOLDEN_DIR = Path(__file__).parent / "golden"
EXTERNAL = {
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}


def external_validator(api_version: str, kind: str) -> jsonschema.Draft4Validator:
    crd = yaml.safe_load((SCHEMAS / EXTERNAL[(api_version, kind)]).read_text())
    version = api_version.split("/")[1]
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    return jsonschema.Draft4Validator(_strict(schema))


def _strict(node: Any) -> Any:
    """OpenAPI -> jsonschema: unknown fields are errors (as the API server would prune them)."""
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def validate_object(obj: dict[str, Any]) -> None:
    key = (obj["apiVersion"], obj["kind"])
    if key in EXTERNAL:
        errors = [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in external_validator(*key).iter_errors(obj)
        ]
        assert not errors, f"{obj['kind']} {obj['metadata']['name']}: {errors}"
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def children(path: Path, backend: str) -> list[dict[str, Any]]:
    body = yaml.safe_load(path.read_text())
    body["metadata"].setdefault("namespace", "default")
    body["metadata"]["uid"] = "00000000-0000-0000-0000-000000000001"
    return build_all(Run.from_body(body, training_backend=backend))


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_child_validates_strictly(path: Path, backend: str) -> None:
    objs = children(path, backend)
    kinds = {o["kind"] for o in objs}
    assert {"ConfigMap", "Deployment", "Service", "Job", "PodMonitor"} <= kinds
    assert ("PyTorchJob" if backend == "pytorchjob" else "TrainJob") in kinds
    for obj in objs:
        validate_object(obj)


def test_validation_is_strict() -> None:
    """A typo in a child would be caught (the check above is not vacuous)."""
    objs = children(EXAMPLES[0], "pytorchjob")
    job = next(o for o in objs if o["kind"] == "Job")
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(Exception, match="imagePullPolicyy"):
        validate_object(job)
    ptj = next(o for o in objs if o["kind"] == "PyTorchJob")
    ptj["spec"]["nprocPerNode"] = 8  # must be a numeric *string*
    with pytest.raises(AssertionError, match="nprocPerNode"):
        validate_object(ptj)


def test_children_details() -> None:
    body = load_example("eagle3-qwen3-8b.yaml")
    body["metadata"]["uid"] = "u"
    run = Run.from_body(body, training_backend="pytorchjob")
    objs = {(o["kind"], o["metadata"]["name"]): o for o in build_all(run)}
    for obj in objs.values():
        assert "team" not in obj["metadata"]["labels"]  # resource labels are not copied
        assert obj["metadata"]["name"].startswith("qwen3-8b-eagle3-")
        if obj["kind"] == "PersistentVolumeClaim":  # retentionPolicy Retain: survives the resource
            assert "ownerReferences" not in obj["metadata"]
            assert obj["spec"]["accessModes"] == ["ReadWriteMany"]
        else:
            assert obj["metadata"]["ownerReferences"][0]["controller"] is True
    dep = objs[("Deployment", run.child_name("server"))]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["startupProbe"]["httpGet"]["path"] == "/health_generate"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health_generate"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert "--enable-metrics" in c["command"] and "--served-model-name" in c["command"]
    assert c["command"][c["command"].index("--served-model-name") + 1] == "qwen3-8b"
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory" and "model-cache" in vols
    regen = objs[("Job", run.child_name("regenerate"))]["spec"]
    assert regen["completionMode"] == "Indexed" and regen["completions"] == regen["parallelism"] == 4
    cmd = regen["template"]["spec"]["containers"][0]["command"]
    assert (
        cmd[:2] == ["deepspec", "regenerate"] and f"http://{run.child_name('server')}.llm.svc:30000/v1" in cmd
    )
    ptj = objs[("PyTorchJob", run.child_name("train"))]["spec"]
    assert ptj["nprocPerNode"] == "8" and "Worker" not in ptj["pytorchReplicaSpecs"]
    tr = ptj["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert tr[0] == "torchrun" and "--nproc-per-node=8" in tr
    assert tr[-5:] == ["-m", "deepspec.cli", "train", "-c", "/etc/deepspec/recipe.yaml"]
    ev = objs[("Job", run.child_name("evaluate"))]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--termination-log" in ev
    # spec.podTemplate reaches every pod: pull secret, envFrom (HF_TOKEN), queue label, mesh opt-out
    for obj in objs.values():
        tmpl = _pod_templates(obj)
        for t in tmpl:
            assert t["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
            assert t["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
            assert t["spec"]["imagePullSecrets"] == [{"name": "registry-credentials"}]
            assert t["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            for c in t["spec"]["containers"]:
                assert {"secretRef": {"name": "hf-token"}} in c["envFrom"]
                assert c["resources"]["requests"], c["name"]  # default requests when none are given
    assert len([o for o in objs.values() if _pod_templates(o)]) >= 6
    ptj_pod = objs[("PyTorchJob", run.child_name("train"))]["spec"]["pytorchReplicaSpecs"]["Master"][
        "template"
    ]
    assert ptj_pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert objs[("PyTorchJob", run.child_name("train"))]["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"


def _pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec") or {}
    if obj["kind"] in ("Job", "Deployment"):
        return [spec["template"]]
    if obj["kind"] == "PyTorchJob":
        return [r["template"] for r in spec["pytorchReplicaSpecs"].values()]
    return []


def test_multi_node_pytorchjob_has_workers_and_rendezvous() -> None:
    body = load_example("dflash-llama-s3.yaml")
    body["metadata"]["uid"] = "u"
    run = Run.from_body(body, training_backend="pytorchjob")
    ptj = next(o for o in build_all(run) if o["kind"] == "PyTorchJob")
    assert ptj["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    cmd = ptj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert "--nnodes=2" in cmd and "--node-rank=$(RANK)" in cmd


def test_recipe_is_a_valid_recipe_with_run_paths() -> None:
    body = load_example("dflash-llama-s3.yaml")
    body["metadata"]["uid"] = "u"
    run = Run.from_body(body)
    recipe = build_recipe(run)
    assert isinstance(recipe, Recipe)
    root = "s3://drafts/deepspec/llm/llama31-8b-dflash"
    assert recipe.training.output_dir == f"{root}/train-{run.ids['train']}/draft"
    assert recipe.regeneration.output == f"{root}/regenerate-{run.ids['regenerate']}/regenerated.jsonl"
    assert recipe.features.cache_path == f"{root}/features-{run.ids['features']}/features"
    assert recipe.evaluation.gate.min_accept_length is None  # the operator gates, not the Job
    assert recipe.draft.block_size == 8  # from the inline recipe fragment
    assert recipe.storage.s3_endpoint_url == "http://minio.storage.svc:9000"


def test_revision_changes_run_id_and_names() -> None:
    body = load_example("minimal.yaml")
    a = Run.from_body(body)
    body["spec"]["target"]["revision"] = "v2"
    b = Run.from_body(body)
    assert a.run_id != b.run_id and a.child_name("train") != b.child_name("train")
    body["spec"]["podTemplate"] = {"priorityClassName": "high"}
    body["spec"]["image"] = "registry.example.com/deepspec:0.2.0"
    body["spec"]["training"]["gpusPerNode"] = 4
    assert Run.from_body(body).run_id == b.run_id  # placement, images and sizes are not part of the run
    body["spec"]["dataset"]["source"] = "https://example.com/moved/prompts.jsonl"
    c = Run.from_body(body)
    assert c.ids["regenerate"] == b.ids["regenerate"] and c.ids["seed"] != b.ids["seed"]
    body["spec"]["evaluation"]["gate"] = {"minAcceptLength": 2.0}
    assert Run.from_body(body).ids == c.ids  # the gate is no stage's input


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_golden_children(backend: str) -> None:
    """Every child pinned, except the recipe text (it follows the recipe models' own defaults, which
    other parts of deepspec own; test_recipe_is_a_valid_recipe_with_run_paths checks it)."""
    objs = children(EXAMPLES[[p.name for p in EXAMPLES].index("eagle3-qwen3-8b.yaml")], backend)
    for o in objs:
        if o["kind"] == "ConfigMap":
            o["data"]["recipe.yaml"] = "<the recipe built from the spec>"
    text = yaml.safe_dump_all(objs, sort_keys=True)
    golden = GOLDEN_DIR / f"eagle3-qwen3-8b.{backend}.yaml"
    if os.environ.get("DEEPSPEC_UPDATE_GOLDENS"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), "missing golden: run with DEEPSPEC_UPDATE_GOLDENS=1"
    assert text == golden.read_text(), (
        f"children changed: inspect and re-run with DEEPSPEC_UPDATE_GOLDENS=1 ({golden})"
    )
