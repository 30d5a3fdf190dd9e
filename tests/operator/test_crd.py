"""The generated CRD: checked-in copies are current, examples validate, invalid resources are rejected.

Schema checks run jsonschema on the CRD's openAPIV3Schema; the CEL rules (which only the API server
evaluates) are mirrored by the spec models' validators, and each invalid case below must be caught
by one of the two with the offending field named.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
import yaml
from operator_harness import EXAMPLES, REPO, load_example
from pydantic import ValidationError

from deepspec.operator.crd import CRD_PATHS, build_crd, crd_yaml, openapi_to_jsonschema
from deepspec.operator.spec import DraftTrainingSpec


def validator() -> jsonschema.Draft4Validator:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft4Validator(openapi_to_jsonschema(schema))


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
    assert spec["regeneration"]["properties"]["sampling"]["properties"]["top_p"]["exclusiveMinimum"] is True
    rules = [r["rule"] for part in spec.values() for r in part.get("x-kubernetes-validations", [])]
    assert any("cache_path" in r for r in rules) and any("gpusPerNode" in r for r in rules)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path: Any) -> None:
    body = yaml.safe_load(path.read_text())
    errors = [e.message for e in validator().iter_errors(body)]
    assert not errors, errors
    DraftTrainingSpec.model_validate(body["spec"])  # the CEL mirrors


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
    ("top-p-zero", "spec.regeneration.sampling.top_p", 0.0, "top_p"),
    ("bad-backend", "spec.training.backend", "mpi", "backend"),
    ("no-benchmarks", "spec.evaluation.benchmarks", [], "benchmarks"),
    ("bad-feature-mode", "spec.features.mode", "disk", "mode"),
    ("missing-target-model", "spec.target", {"revision": "x"}, "model"),
]
CEL_INVALID = [
    ("offline-needs-cache", {"features": {"mode": "offline"}}, "cache_path"),
    ("s3-needs-bucket-and-secret", {"storage": {"s3": {"prefix": "x"}}}, "storage.s3"),
    (
        "pvc-and-s3",
        {"storage": {"pvc": {}, "s3": {"bucket": "b", "credentialsSecretRef": {"name": "s"}}}},
        "storage",
    ),
    ("zero-gpus", {"training": {"algorithm": "dspark", "gpusPerNode": 0}}, "gpusPerNode"),
    (
        "gate-above-proposals",
        {"evaluation": {"benchmarks": ["gsm8k"], "numProposals": 3, "gate": {"min_accept_length": 5.0}}},
        "min_accept_length",
    ),
    ("max-drop-too-large", {"evaluation": {"benchmarks": ["gsm8k"], "gate": {"max_drop": 9.0}}}, "max_drop"),
    (
        "tp-not-dividing-gpus",
        {"target": {"model": "m", "tensorParallelSize": 2, "gpus": 3}},
        "tensorParallelSize",
    ),
]


@pytest.mark.parametrize(
    ("case", "path", "value", "field"), SCHEMA_INVALID, ids=[c[0] for c in SCHEMA_INVALID]
)
def test_schema_rejects(case: str, path: str, value: Any, field: str) -> None:
    body = _set(BASE, path, value)
    errors = list(validator().iter_errors(body))
    assert errors, f"{case} was accepted"
    text = " ".join(f"{'.'.join(map(str, e.absolute_path))} {e.message}" for e in errors)
    assert field in text, text


@pytest.mark.parametrize(("case", "patch", "field"), CEL_INVALID, ids=[c[0] for c in CEL_INVALID])
def test_cel_rules_reject(case: str, patch: dict[str, Any], field: str) -> None:
    spec = copy.deepcopy(BASE["spec"])
    for k, v in patch.items():
        spec[k] = {**spec.get(k, {}), **v} if isinstance(v, dict) else v
    # structurally fine: only the cross-field rule catches it
    assert not list(validator().iter_errors({**BASE, "spec": spec})), case
    with pytest.raises(ValidationError) as err:
        DraftTrainingSpec.model_validate(spec)
    assert field in str(err.value)
    # and the CRD carries a CEL rule whose message names the same field
    messages = [r["message"] for r in _all_rules(build_crd())]
    assert any(field.split(".")[-1] in m for m in messages), messages


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
    from deepspec.config import RegenerationConfig, SamplingConfig, TargetConfig

    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    target = spec["target"]["properties"]
    assert (
        target["servedModelName"]["description"] == TargetConfig.model_fields["served_model_name"].description
    )
    sampling = spec["regeneration"]["properties"]["sampling"]["properties"]
    assert set(sampling) == set(SamplingConfig.model_fields)
    assert spec["regeneration"]["properties"]["concurrency"]["maximum"] == 4096
    assert (
        RegenerationConfig.model_fields["concurrency"].description
        == spec["regeneration"]["properties"]["concurrency"]["description"]
    )
