"""The generated CRD: checked-in copies are current; admission as the API server does it.

Every shipped example and every invalid variant goes through :mod:`cel_admission`: structural
defaulting, the OpenAPI schema, then every ``x-kubernetes-validations`` rule evaluated by a real CEL
runtime (Google's cel-cpp through ``cel-expr-python``). Examples must be accepted; each invalid variant
must be rejected with its own rule's message. The spec models' pydantic validators (the operator's
own check) must agree.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml
from cel_admission import admit, cel_rejections, crd_schema, default
from operator_harness import EXAMPLES, REPO, load_example
from pydantic import ValidationError

from deepspec.operator.crd import CRD_PATHS, build_crd, crd_yaml
from deepspec.operator.spec import DraftTrainingSpec


@pytest.mark.parametrize("rel", CRD_PATHS, ids=str)
def test_checked_in_crd_matches_generated(rel: Any) -> None:
    on_disk = (REPO / rel).read_text()
    assert on_disk == crd_yaml(), f"{rel} is stale: run `deepspec operator crd --write`"


def test_crd_is_structural() -> None:
    text = crd_yaml()
    for forbidden in ("$ref", "anyOf", "$defs", "title:"):
        assert forbidden not in text
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    assert crd["spec"]["names"]["shortNames"] == ["dt"] and version["subresources"] == {"status": {}}
    cols = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Algorithm", "Target", "AcceptLen", "Age"} <= cols
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["target"]["properties"]["resources"]["x-kubernetes-preserve-unknown-fields"] is True
    assert spec["target"]["properties"]["revision"]["nullable"] is True
    assert spec["regeneration"]["properties"]["sampling"]["properties"]["topP"]["exclusiveMinimum"] is True
    assert spec["evaluation"]["properties"]["gate"]["default"] == {}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_admitted(path: Any) -> None:
    body = yaml.safe_load(path.read_text())
    stored, rejections = admit(body)
    assert not rejections, rejections
    DraftTrainingSpec.model_validate(stored["spec"])  # the operator reads what the server stored
    DraftTrainingSpec.model_validate(body["spec"])


def test_minimal_example_needs_defaulting_for_its_cel_rules() -> None:
    """``evaluation`` without ``gate``: the rules select ``self.gate``, present only through ``default: {}``."""
    body = load_example("minimal.yaml")
    assert "gate" not in body["spec"]["evaluation"]
    stored, rejections = admit(body)
    assert not rejections and stored["spec"]["evaluation"]["gate"] == {}
    # without structural defaulting the same rules would reject the object (absent field -> error)
    schema = crd_schema()["properties"]["spec"]
    undefaulted = cel_rejections(body["spec"], schema, ".spec")
    assert any("evaluation error" in r.message and "gate" in r.message for r in undefaulted), undefaulted


def _set(body: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


BASE = load_example("minimal.yaml")
# (case id, dotted path, value, field expected in the error)
SCHEMA_INVALID = [
    ("unknown-key", "spec.target.modle", "x", "modle"),
    ("bad-algorithm", "spec.training.algorithm", "medusa", "algorithm"),
    ("negative-replicas", "spec.regeneration.replicas", 0, "replicas"),
    ("top-p-zero", "spec.regeneration.sampling.topP", 0.0, "topP"),
    ("snake-case-key", "spec.regeneration.sampling.top_p", 0.9, "top_p"),
    ("bad-backend", "spec.training.backend", "mpi", "backend"),
    ("no-benchmarks", "spec.evaluation.benchmarks", [], "benchmarks"),
    ("bad-feature-mode", "spec.features.mode", "disk", "mode"),
    ("missing-target-model", "spec.target", {"revision": "x"}, "model"),
    ("s3-without-bucket", "spec.storage", {"s3": {"prefix": "x"}}, "bucket"),
]
# (case id, spec patch, the rule message expected)
CEL_INVALID = [
    ("offline-needs-cache", {"features": {"mode": "offline"}},
     "features.cachePath is required when features.mode is 'offline'"),
    ("pvc-and-s3", {"storage": {"pvc": {}, "s3": {"bucket": "b"}}}, "storage: set either pvc or s3, not both"),
    ("zero-gpus", {"training": {"algorithm": "dspark", "gpusPerNode": 0}},
     "training.nodes * training.gpusPerNode must be > 0"),
    ("gate-above-proposals",
     {"evaluation": {"benchmarks": ["gsm8k"], "numProposals": 3, "gate": {"minAcceptLength": 5.0}}},
     "evaluation.gate.minAcceptLength cannot exceed evaluation.numProposals + 1"),
    ("max-drop-too-large", {"evaluation": {"benchmarks": ["gsm8k"], "gate": {"maxDrop": 9}}},
     "evaluation.gate.maxDrop must be below evaluation.numProposals"),
    ("tp-not-dividing-gpus", {"target": {"model": "m", "tensorParallelSize": 2, "gpus": 3}},
     "target.gpus must be a multiple of target.tensorParallelSize (data-parallel replicas)"),
    ("multi-node-on-rwo", {"training": {"algorithm": "dspark", "nodes": 2}},
     "training.nodes > 1 needs storage.pvc.accessMode ReadWriteMany or storage.s3"),
    ("scrape-without-urls", {"monitoring": {"mode": "scrape"}}, "monitoring.metricsUrls is required in scrape mode"),
    ("canary-without-url", {"monitoring": {"mode": "canary"}}, "monitoring.baseUrl is required in canary mode"),
    ("serving-ref-without-field", {"publish": {"servingRef": {"kind": "LLMInferenceService", "name": "x",
                                                              "apiVersion": "serving.kserve.io/v1alpha1"}}},
     "publish.servingRef.fieldPath is required for kinds other than Deployment"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "path", "value", "field"), SCHEMA_INVALID, ids=[c[0] for c in SCHEMA_INVALID]
)
def test_schema_rejects(case: str, path: str, value: Any, field: str) -> None:
    _, rejections = admit(_set(BASE, path, value))
    assert rejections, f"{case} was accepted"
    text = " ".join(f"{r.path} {r.message}" for r in rejections)
    assert field in text, text


@pytest.mark.parametrize(("case", "patch", "message"), CEL_INVALID, ids=[c[0] for c in CEL_INVALID])
def test_cel_rules_reject(case: str, patch: dict[str, Any], message: str) -> None:
    spec = copy.deepcopy(BASE["spec"])
    for k, v in patch.items():
        spec[k] = {**spec.get(k, {}), **v} if isinstance(v, dict) else v
    _, rejections = admit({**BASE, "spec": spec})
    # rejected by exactly its own rule, with that rule's message (not by an evaluation error)
    assert [r.message for r in rejections] == [message], rejections
    with pytest.raises(ValidationError) as err:  # the operator's own check agrees
        DraftTrainingSpec.model_validate(spec)
    assert message in str(err.value)


def test_every_rule_is_exercised() -> None:
    rules = {r["message"] for r in _all_rules(build_crd())}
    assert rules == {c[2] for c in CEL_INVALID}


def test_defaults_do_not_pin_operator_choices() -> None:
    """The CRD defaults no image: a stored object keeps following the operator's own image."""
    stored, _ = admit(BASE)
    assert "image" not in stored["spec"]
    assert stored["spec"]["storage"] == {"pruneSuperseded": True}
    assert stored["spec"]["deadlines"]["trainSeconds"] > 0


def test_field_names_are_camel_case() -> None:
    bad: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        for name, sub in (node.get("properties") or {}).items():
            if not re.fullmatch(r"[a-z][a-zA-Z0-9]*", name):
                bad.append(f"{path}.{name}")
            walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], path + "[]")

    walk(crd_schema()["properties"]["spec"], "spec")
    assert not bad, bad


def test_defaulting_matches_the_operator_defaults() -> None:
    """What the server stores for the minimal example parses to the same spec as the raw example."""
    stored = default(copy.deepcopy(BASE), crd_schema())
    assert DraftTrainingSpec.model_validate(stored["spec"]) == DraftTrainingSpec.model_validate(BASE["spec"])


def _all_rules(node: Any) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    if isinstance(node, dict):
        out += node.get("x-kubernetes-validations", [])
        for v in node.values():
            out += _all_rules(v)
    elif isinstance(node, list):
        for v in node:
            out += _all_rules(v)
    return out


def test_spec_reuses_recipe_fields() -> None:
    """The CRD's descriptions and bounds come from deepspec.config (no duplicated field definitions)."""
    from pydantic.alias_generators import to_camel

    from deepspec.config import RegenerationConfig, SamplingConfig, TargetConfig

    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    target = spec["target"]["properties"]
    assert (
        target["servedModelName"]["description"] == TargetConfig.model_fields["served_model_name"].description
    )
    sampling = spec["regeneration"]["properties"]["sampling"]["properties"]
    assert set(sampling) == {to_camel(f) for f in SamplingConfig.model_fields}
    assert sampling["topP"]["description"] == SamplingConfig.model_fields["top_p"].description
    assert spec["regeneration"]["properties"]["concurrency"]["maximum"] == 4096
    assert (
        RegenerationConfig.model_fields["concurrency"].description
        == spec["regeneration"]["properties"]["concurrency"]["description"]
    )
