"""Pieces of the serving side: the serving-resource patch, reading the monitor's /metrics, the
publish Job's command on S3, and the RBAC the serving update needs."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from operator_harness import allowed, rbac_rules
from prometheus_client import CollectorRegistry, generate_latest

from deepspec.cli import main as deepspec_main
from deepspec.monitor.drift import Baseline, DriftPolicy, DriftState
from deepspec.monitor.publish import read_current
from deepspec.monitor.scrape import Measurement
from deepspec.monitor.service import Monitor, MonitorCollector, MonitorLabels
from deepspec.monitor.window import AcceptanceSample
from deepspec.operator.builders import serving_patch
from deepspec.operator.live import parse_monitor_metrics
from deepspec.operator.spec import ServingRef

NOW = "2026-12-01T08:00:00Z"


def deployment(args: list[str], name: str = "sglang") -> dict:
    return {"spec": {"template": {"spec": {"containers": [
        {"name": "sidecar", "image": "envoy"},
        {"name": name, "image": "sglang", "command": ["python3", "-m", "sglang.launch_server"], "args": args},
    ]}}}}  # fmt: skip


def test_serving_patch_replaces_the_draft_path_in_every_spelling() -> None:
    ref = ServingRef(name="sg", container="sglang")
    for args, want in [
        (["--tp", "2", "--speculative-draft-model-path", "/old"], ["--tp", "2", "--speculative-draft-model-path", "/new"]),
        (["--speculative-draft-model-path=/old", "--tp=2"], ["--speculative-draft-model-path=/new", "--tp=2"]),
        (["--tp", "2"], ["--tp", "2", "--speculative-draft-model-path", "/new"]),
    ]:  # fmt: skip
        patch = serving_patch(ref, deployment(args), "/new")
        containers = patch["spec"]["template"]["spec"]["containers"]
        assert containers[1]["args"] == want and containers[0] == {"name": "sidecar", "image": "envoy"}
    assert serving_patch(ref, deployment(["--speculative-draft-model-path", "/new"]), "/new") is None
    with pytest.raises(ValueError, match="no container 'sglang'"):
        serving_patch(ref, deployment([], name="other"), "/new")


def test_serving_patch_of_another_kind_sets_the_field_path() -> None:
    ref = ServingRef(apiVersion="serving.kserve.io/v1alpha1", kind="LLMInferenceService", name="q",
                     fieldPath="spec.model.draft.uri")  # fmt: skip
    live = {"spec": {"model": {"uri": "hf://Qwen/Qwen3-8B", "draft": {"uri": "/old"}}}}
    assert serving_patch(ref, live, "s3://b/p/versions/v2") == {
        "spec": {"model": {"draft": {"uri": "s3://b/p/versions/v2"}}}
    }
    live["spec"]["model"]["draft"]["uri"] = "s3://b/p/versions/v2"
    assert serving_patch(ref, live, "s3://b/p/versions/v2") is None
    # the chart grants what the operator needs to patch it (default rbac.servingResources)
    for kind in ("ClusterRole", "Role"):
        rules = rbac_rules({"watchNamespaces": ["llm"]} if kind == "Role" else {}, kind)
        assert allowed(rules, "patch", "serving.kserve.io", "llminferenceservices")
        assert allowed(rules, "get", "serving.kserve.io", "llminferenceservices")
        assert allowed(rules, "patch", "apps", "deployments")


class _Source:
    def collect(self) -> Measurement:
        return Measurement(AcceptanceSample(1000.0, 1500.0), speculating=True)


def _exposition(version: str) -> str:
    monitor = Monitor(_Source(), MonitorLabels("qwen3-8b", version, "sglang", "scrape"), DriftPolicy(),
                      600.0, Baseline(3.0, version), clock=lambda: 1_000_000.0)  # fmt: skip
    monitor.tick()
    registry = CollectorRegistry()
    registry.register(MonitorCollector(monitor))
    return generate_latest(registry).decode()


def test_monitor_metrics_are_read_for_the_serving_draft_only() -> None:
    ok = parse_monitor_metrics(_exposition("run-a"), "run-a", NOW)
    assert ok.state is DriftState.BELOW_BASELINE  # 2.5 live against 3.0: below, not yet drift
    assert ok.observed == pytest.approx(2.5) and ok.baseline == pytest.approx(3.0)
    other = parse_monitor_metrics(_exposition("run-a"), "run-b", NOW)  # not restarted on the new draft
    assert other.state is DriftState.MISSING and "run-a" in other.reason and not other.drift
    down = parse_monitor_metrics(None, "run-a", NOW)
    assert down.state is DriftState.MISSING and not down.drift


def test_publish_command_from_and_to_s3(
    moto_s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEPSPEC_CACHE", str(tmp_path / "cache"))
    s3 = boto3.client("s3", endpoint_url=moto_s3_endpoint)
    s3.create_bucket(Bucket="drafts")
    for key, body in [
        ("runs/q/export-1/config.json", b"{}"),
        ("runs/q/export-1/sub/model.safetensors", b"w"),
    ]:
        s3.put_object(Bucket="drafts", Key=key, Body=body)
    argv = ["operator", "publish", "s3://drafts/runs/q/export-1", "s3://drafts/published/q",
            "--version", "q-run1", "--metadata", json.dumps({"run": "run1"}), "--endpoint-url", moto_s3_endpoint]  # fmt: skip
    assert deepspec_main(argv) == 0
    current = read_current("s3://drafts/published/q", moto_s3_endpoint)
    assert current is not None and current["version"] == "q-run1" and current["run"] == "run1"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="drafts", Prefix="published/q/versions/")["Contents"]}
    assert keys == {
        f"published/q/versions/q-run1/{n}" for n in ("config.json", "sub/model.safetensors", "MANIFEST.json")
    }
    bad = [*argv[:4], "--version", "bad/version", "--endpoint-url", moto_s3_endpoint]
    assert deepspec_main(bad) == 2  # a clear error, no traceback
