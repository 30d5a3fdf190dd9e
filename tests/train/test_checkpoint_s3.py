"""Checkpoints under an ``s3://`` storage root are written to S3 (moto's server), pruned there, and a
new trainer resumes from them; nothing lands in the working directory (no local folder named ``s3:``)."""

from __future__ import annotations

import json
import shutil

import torch

from deepspec.config import Recipe
from deepspec.testing.tiny import tiny_recipe
from deepspec.train.trainer import Trainer


def _recipe(tiny_dir: str, tiny_data: str, endpoint: str, max_steps: int) -> Recipe:
    return Recipe.model_validate(
        tiny_recipe(
            tiny_dir, tiny_data, "draft", algorithm="dflash",
            storage={"root": "s3://train-ckpt/run", "s3_endpoint_url": endpoint},
            training={"max_steps": max_steps, "save_every": 1, "keep_last": 2},
        )
    )  # fmt: skip


def test_checkpoints_under_an_s3_root_are_written_to_s3_and_resumed(
    tmp_path, monkeypatch, tiny_dir, tiny_data, moto_s3_endpoint
):
    import boto3
    from safetensors.torch import load

    s3 = boto3.client("s3", endpoint_url=moto_s3_endpoint)
    s3.create_bucket(Bucket="train-ckpt")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("DEEPSPEC_CACHE", str(tmp_path / "cache"))

    trainer = Trainer(_recipe(tiny_dir, tiny_data, moto_s3_endpoint, 4), device="cpu", progress=False)
    trainer.train()
    trainer.close()

    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="train-ckpt")["Contents"]}
    prefix = "run/draft/"
    step = prefix + "step_4/"
    for name in (
        "config.json",
        "model.safetensors",
        "trainer_state.pt",
        "rng_rank0.pt",
        "optimizer/.metadata",
    ):
        assert step + name in keys, name
    assert prefix + "metrics.jsonl" in keys
    assert not any(k.startswith((prefix + "step_1/", prefix + "step_2/")) for k in keys)  # keep_last=2
    assert any(k.startswith(prefix + "step_3/") for k in keys)
    latest = s3.get_object(Bucket="train-ckpt", Key=prefix + "latest")["Body"].read().decode()
    assert latest.strip() == "step_4"
    assert list(work.iterdir()) == []  # nothing written locally (in particular no folder "s3:")

    saved = load(s3.get_object(Bucket="train-ckpt", Key=step + "model.safetensors")["Body"].read())
    cfg = json.loads(s3.get_object(Bucket="train-ckpt", Key=step + "config.json")["Body"].read())
    shutil.rmtree(tmp_path / "cache")  # a fresh machine: only S3 holds the run
    resumed = Trainer(_recipe(tiny_dir, tiny_data, moto_s3_endpoint, 6), device="cpu", progress=False)
    assert resumed.step == 4
    assert resumed.tokens_seen == cfg["deepspec_training"]["tokens_seen"] > 0
    state = resumed.draft.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert resumed.optimizer.state  # the optimizer state came back from the DCP folder on S3
    resumed.train()
    resumed.close()
    log = s3.get_object(Bucket="train-ckpt", Key=prefix + "metrics.jsonl")["Body"].read().decode()
    assert [json.loads(line)["step"] for line in log.splitlines()] == list(range(1, 7))
    assert list(work.iterdir()) == []
