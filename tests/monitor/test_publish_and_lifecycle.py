"""Library code for the operator: GitOps publication (local volume and S3 via moto) and the
retrain / promotion decisions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
import pytest

from deepspec.monitor.drift import DriftState, DriftStatus
from deepspec.monitor.lifecycle import promotion_decision, should_retrain
from deepspec.monitor.publish import PublishError, publish_draft, read_current, set_current


def draft(tmp_path: Path, name: str, weights: bytes) -> Path:
    d = tmp_path / name
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLMEagle3"]}))
    (d / "model.safetensors").write_bytes(weights)
    (d / "sub" / "extra.txt").write_text("x")
    return d


def test_local_publication_versions_pointer_and_symlink(tmp_path: Path) -> None:
    dest = str(tmp_path / "published")
    a, b = draft(tmp_path, "a", b"A" * 100), draft(tmp_path, "b", b"B" * 100)
    pub = publish_draft(a, dest, "run-1", {"targetRevision": "v1", "acceptLength": 3.1}, now=1_800_000_000)
    assert pub.files == 3 and not pub.already_published
    assert (a / "model.safetensors").read_bytes() == b"A" * 100  # the source is copied, not moved
    cur = read_current(dest)
    assert cur is not None
    assert (cur["version"], cur["path"], cur["previous"], cur["targetRevision"]) == (
        "run-1",
        "versions/run-1",
        None,
        "v1",
    )
    assert cur["published_at"] == "2027-01-15T08:00:00Z"
    link = Path(dest) / "current"
    assert os.readlink(link) == "versions/run-1" and (link / "model.safetensors").read_bytes() == b"A" * 100

    publish_draft(b, dest, "run-2")
    assert read_current(dest)["previous"] == "run-1"  # type: ignore[index]
    assert (link / "model.safetensors").read_bytes() == b"B" * 100
    manifest = json.loads((Path(dest) / "versions/run-2/MANIFEST.json").read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "sub/extra.txt"}

    assert publish_draft(b, dest, "run-2").already_published  # same files: a no-op
    with pytest.raises(PublishError, match="immutable"):
        publish_draft(a, dest, "run-2")
    assert set_current(dest, "run-1")["previous"] == "run-2"  # rollback
    assert (link / "model.safetensors").read_bytes() == b"A" * 100
    with pytest.raises(PublishError, match=r"published: \['run-1', 'run-2'\]"):
        set_current(dest, "run-9")
    with pytest.raises(PublishError, match="valid folder name"):
        publish_draft(a, dest, "../escape")
    with pytest.raises(PublishError, match="not found"):
        publish_draft(tmp_path / "nope", dest, "run-3")


def test_s3_publication(tmp_path: Path, moto_s3_endpoint: str) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_s3_endpoint)
    s3.create_bucket(Bucket="drafts-publish")
    dest = "s3://drafts-publish/team/qwen3"
    pub = publish_draft(draft(tmp_path, "a", b"A" * 10), dest, "run-1", endpoint_url=moto_s3_endpoint)
    assert pub.uri == "s3://drafts-publish/team/qwen3/versions/run-1"
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="drafts-publish")["Contents"])
    assert keys == [
        "team/qwen3/current.json",
        "team/qwen3/versions/run-1/MANIFEST.json",
        "team/qwen3/versions/run-1/config.json",
        "team/qwen3/versions/run-1/model.safetensors",
        "team/qwen3/versions/run-1/sub/extra.txt",
    ]
    cur = read_current(dest, endpoint_url=moto_s3_endpoint)
    assert cur is not None and cur["uri"] == pub.uri


def drift_status(state: DriftState) -> DriftStatus:
    return DriftStatus(state=state, observed=2.1, baseline=3.0, reason=f"{state.value} reason")


def test_retrain_policies() -> None:
    same = {"target_revision": "v2", "serving_target_revision": "v2"}
    bumped = {"target_revision": "v3", "serving_target_revision": "v2"}
    assert not should_retrain("manual", **bumped).act
    assert should_retrain("onTargetUpdate", **bumped).act
    assert "'v2' to 'v3'" in should_retrain("onDrift", **bumped).reason
    assert not should_retrain("onTargetUpdate", **same, drift=drift_status(DriftState.DRIFT)).act
    d = should_retrain("onDrift", **same, drift=drift_status(DriftState.DRIFT))
    assert d.act and "drift reason" in d.reason
    for st in (DriftState.BROKEN, DriftState.MISSING, DriftState.BELOW_BASELINE, DriftState.OK):
        assert not should_retrain("onDrift", **same, drift=drift_status(st)).act
    assert not should_retrain("onDrift", **bumped, run_in_progress=True).act
    with pytest.raises(ValueError, match="retrain policy"):
        should_retrain("always", **same)  # type: ignore[arg-type]


def test_promotion_only_when_the_new_draft_wins_on_the_new_target() -> None:
    assert promotion_decision(3.2, 3.0).act
    lose = promotion_decision(2.9, 3.0)
    assert not lose.act and "keeping the serving one" in lose.reason
    assert not promotion_decision(3.05, 3.0, min_gain=0.1).act
    assert not promotion_decision(2.0, None, gate=2.5).act
    assert promotion_decision(2.6, None, gate=2.5).act
    with pytest.raises(ValueError, match="candidate"):
        promotion_decision(float("nan"), 3.0)
