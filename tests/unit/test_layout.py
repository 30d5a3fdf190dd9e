"""The run layout: every output under storage.root, inputs relative to the working directory, s3 transfers."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest

from deepspec.config import load_recipe
from deepspec.layout import RunLayout
from deepspec.storage import atomic_write_json, atomic_write_text


def test_relative_outputs_land_under_the_root_and_inputs_stay_relative(tmp_path):
    recipe = load_recipe(None, [f"storage.root={tmp_path}", "training.output_dir=/abs/ckpt"])
    layout = RunLayout.from_recipe(recipe)
    assert layout.regenerated == str(tmp_path / recipe.regeneration.output)
    assert layout.eval_dir == str(tmp_path / recipe.evaluation.output_dir)
    assert layout.export_dir == str(tmp_path / recipe.export.output_dir)
    assert layout.checkpoints == "/abs/ckpt"  # absolute paths are kept
    assert layout.checkpoint() == "/abs/ckpt/latest"
    assert layout.checkpoint(12) == "/abs/ckpt/step_12"
    assert layout.dataset == recipe.data.path  # inputs are the user's paths
    assert all(v.startswith((str(tmp_path), "/abs")) for v in layout.all_outputs().values())


def test_s3_root_makes_every_output_an_s3_key():
    recipe = load_recipe(None, ["storage.root=s3://bucket/team/run1"])
    layout = RunLayout.from_recipe(recipe)
    for name, uri in layout.all_outputs().items():
        assert uri.startswith("s3://bucket/team/run1/"), name
    assert layout.is_remote


def test_local_output_and_input_round_trip_through_s3(moto_s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSPEC_CACHE", str(tmp_path / "cache"))
    boto3.client("s3", endpoint_url=moto_s3_endpoint).create_bucket(Bucket="layout")
    recipe = load_recipe(None, ["storage.root=s3://layout/r", f"storage.s3_endpoint_url={moto_s3_endpoint}"])
    layout = RunLayout.from_recipe(recipe)
    with layout.local_output(layout.eval_dir) as d:
        (d / "report.json").write_text(json.dumps({"tau": 2.5}))
        (d / "plots").mkdir()
        (d / "plots" / "a.png").write_bytes(b"png")
    # nothing written locally under a folder named "s3:"
    assert not Path("s3:").exists()
    folder = layout.local_input(layout.eval_dir)
    assert json.loads((folder / "report.json").read_text()) == {"tau": 2.5}
    assert (folder / "plots" / "a.png").read_bytes() == b"png"
    one = layout.local_input(layout.eval_dir + "/report.json")
    assert one.read_text() == '{"tau": 2.5}'
    with pytest.raises(FileNotFoundError, match="does not exist"):
        layout.local_input(layout.eval_dir + "/missing.json")


def test_failed_block_uploads_nothing(moto_s3_endpoint, tmp_path):
    s3 = boto3.client("s3", endpoint_url=moto_s3_endpoint)
    s3.create_bucket(Bucket="layout-fail")
    recipe = load_recipe(
        None, ["storage.root=s3://layout-fail/r", f"storage.s3_endpoint_url={moto_s3_endpoint}"]
    )
    layout = RunLayout.from_recipe(recipe)
    with pytest.raises(RuntimeError), layout.local_output(layout.export_dir) as d:
        (d / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("export failed")
    assert "Contents" not in s3.list_objects_v2(Bucket="layout-fail")


def test_atomic_writes_replace_whole_files(tmp_path):
    p = tmp_path / "sub" / "f.json"
    atomic_write_json(p, {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1}
    atomic_write_text(p, "x")
    assert p.read_text() == "x"
    assert [q.name for q in p.parent.iterdir()] == ["f.json"]  # no temp files left behind


def test_a_target_model_on_s3_is_refused_when_the_recipe_is_validated():
    from deepspec.config import RecipeError

    with pytest.raises(RecipeError, match=r"target\.model.*s3:// is not supported"):
        load_recipe(None, ["target.model=s3://models/qwen3"])


def test_resolving_a_resolved_path_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for root in ("out/run1", ".", "s3://b/p"):
        layout = RunLayout.from_recipe(load_recipe(None, [f"storage.root={root}"]))
        for uri in layout.all_outputs().values():
            assert layout.resolve(uri) == uri, (root, uri)
        assert layout.resolve(layout.checkpoint()) == layout.checkpoint()
    layout = RunLayout.from_recipe(load_recipe(None, ["storage.root=out/run1"]))
    assert layout.checkpoints == str(tmp_path / "out/run1" / "runs/demo/draft")


def test_a_failed_local_block_leaves_no_empty_folder(tmp_path):
    layout = RunLayout.from_recipe(load_recipe(None, [f"storage.root={tmp_path}"]))
    with pytest.raises(RuntimeError), layout.local_output(layout.export_dir):
        raise RuntimeError("refused")
    assert not Path(layout.export_dir).exists()
