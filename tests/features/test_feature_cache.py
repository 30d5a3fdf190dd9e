"""Feature cache: equals online features, resumes after SIGKILL to the same content hash, refuses
mismatched targets / tokenizers / layers, detects corruption, checks space, works on S3 (moto)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deepspec.config import Recipe, draft_model_config
from deepspec.data.sequences import load_sequences
from deepspec.features.cache import (
    CacheCorruptError,
    CacheError,
    CacheMismatchError,
    FeatureCache,
    FeatureCacheWriter,
    bytes_per_token,
    cache_identity,
    dequantize_fp8,
    quantize_fp8,
)
from deepspec.target_model.model import TargetModel
from deepspec.testing.tiny import tiny_recipe
from deepspec.train.features import OfflineFeatures, OnlineFeatures

LAYERS = [0, 1, 2]  # the cache stores these; drafts below use subsets


def _setup(tiny_dir, tiny_data, tmp_path, **sections):
    from transformers import AutoTokenizer

    recipe = Recipe.model_validate(tiny_recipe(tiny_dir, tiny_data, str(tmp_path / "out"), **sections))
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    target = TargetModel.from_pretrained(tiny_dir, LAYERS, "dflash", device="cpu")
    seqs = load_sequences(recipe, tok)
    return recipe, tok, target, seqs


def _write(recipe, tok, target, seqs, uri, dtype="float32", shard_tokens=1024, endpoint=None):
    w = FeatureCacheWriter(uri, target, seqs, cache_identity(recipe, target, tok), storage_dtype=dtype,
                           shard_tokens=shard_tokens, batch_tokens=512, endpoint_url=endpoint)  # fmt: skip
    return w.run(progress=False)


@pytest.fixture(scope="module")
def env(tiny_dir, tiny_data, tmp_path_factory):
    return _setup(tiny_dir, tiny_data, tmp_path_factory.mktemp("cache"))


def test_fp8_roundtrip_per_row_scale():
    x = torch.randn(7, 3 * 16) * torch.tensor([0.01, 1.0, 300.0]).repeat_interleave(16)
    q, s = quantize_fp8(x, 3)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (7, 3)
    err = (dequantize_fp8(q, s) - x).abs() / x.abs().reshape(7, 3, 16).amax(-1).repeat_interleave(16, -1)
    assert err.max() < 0.07  # e4m3: 3 mantissa bits, relative to the row-group max


def test_bytes_per_token_meets_the_bar():
    # Qwen3-4B, 5 layers + last hidden: reference bf16 30,726 B/token, goal <= 15,400 with fp8
    assert bytes_per_token(2560, 5, "bfloat16") <= 30_726
    assert bytes_per_token(2560, 5, "float8_e4m3fn") <= 15_400


@pytest.mark.parametrize(
    ("algorithm", "dtype", "rtol"),
    [("eagle3", "float32", 1e-5), ("dflash", "float32", 1e-5), ("dspark", "bfloat16", 2e-2),
     ("dflash", "float8_e4m3fn", 5e-2)],
)  # fmt: skip
def test_offline_losses_equal_online(env, tmp_path, algorithm, dtype, rtol):
    from deepspec.models import build_draft

    recipe, tok, target, seqs = env
    _write(recipe, tok, target, seqs, str(tmp_path / "c"), dtype=dtype)
    cache = FeatureCache(str(tmp_path / "c"))
    layers = [0, 2]  # a subset: one cache serves drafts with other layer choices
    sub = TargetModel.from_model(target.model, layers)
    cache.validate(cache_identity(recipe, sub, tok), needed_layer_ids=layers)
    cfg = draft_model_config(algorithm=algorithm, num_layers=1)
    torch.manual_seed(0)
    draft = build_draft(cfg, sub)
    online = OnlineFeatures(sub, seqs)
    offline = OfflineFeatures(cache, layers, torch.device("cpu"), torch.float32)
    assert offline.lengths == online.lengths
    for indices in ([0, 5], [3], [7, 11, 19]):
        on, off = online.batch(indices), offline.batch(indices)
        assert torch.equal(on.input_ids, off.input_ids) and torch.equal(on.loss_mask, off.loss_mask)
        torch.manual_seed(1)
        loss_on = draft(on).loss
        torch.manual_seed(1)
        loss_off = draft(off).loss
        torch.testing.assert_close(loss_off, loss_on, rtol=rtol, atol=1e-6)


def test_manifest_contents(env, tmp_path):
    recipe, tok, target, seqs = env
    m = _write(recipe, tok, target, seqs, str(tmp_path / "c"), dtype="float8_e4m3fn")
    assert m["complete"] and m["layer_ids"] == LAYERS and m["storage_dtype"] == "float8_e4m3fn"
    assert m["num_shards"] >= 2 and all(len(s["sha256"]) == 64 for s in m["shards"])
    assert m["target"]["model"] == recipe.target.model and "revision" in m["target"]
    assert m["tokenizer_hash"] and m["chat_template_hash"]
    assert m["num_tokens"] == sum(int(s.input_ids.numel()) for s in seqs)
    assert (tmp_path / "c" / "index.json").is_file()


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import deepspec.features.cache as cache_mod
    from test_feature_cache import _setup, _write
    from pathlib import Path
    def crash(shard, batch):
        if shard == 1 and batch == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    cache_mod._CRASH_HOOK = crash
    recipe, tok, target, seqs = _setup({tiny_dir!r}, {tiny_data!r}, Path({tmp!r}))
    _write(recipe, tok, target, seqs, {uri!r})
    """
)


def test_killed_writer_resumes_to_same_content_hash(env, tiny_dir, tiny_data, tmp_path):
    recipe, tok, target, seqs = env
    straight = _write(recipe, tok, target, seqs, str(tmp_path / "straight"))
    uri = str(tmp_path / "killed")
    script = CRASH_SCRIPT.format(tests=str(Path(__file__).parent), tiny_dir=tiny_dir, tiny_data=tiny_data,
                                 tmp=str(tmp_path), uri=uri)  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) == 1  # shard 0 done; 1 was in flight
    # leftovers a crash can leave: a half-written shard file, and damage to a finished one
    (tmp_path / "killed" / "shards" / "shard_00001.safetensors").write_bytes(b"partial")
    shard0 = tmp_path / "killed" / "shards" / "shard_00000.safetensors"
    shard0.write_bytes(shard0.read_bytes()[:-10] + b"0123456789")
    resumed = _write(recipe, tok, target, seqs, uri)
    assert resumed["complete"]
    assert resumed["content_hash"] == straight["content_hash"]


def test_mismatched_cache_is_refused(env, tmp_path):
    recipe, tok, target, seqs = env
    _write(recipe, tok, target, seqs, str(tmp_path / "c"))
    cache = FeatureCache(str(tmp_path / "c"))
    ident = cache_identity(recipe, target, tok)
    cache.validate(ident)  # the right one passes

    other_layers = TargetModel.from_model(target.model, [1, 3])
    with pytest.raises(CacheMismatchError, match=r"layer ids: need \[1, 3\].*missing \[3\]"):
        cache.validate(cache_identity(recipe, other_layers, tok))

    rev = recipe.model_copy(deep=True)
    rev.target.revision = "v2"
    with pytest.raises(CacheMismatchError, match="target revision: cache None, now 'v2'"):
        cache.validate(cache_identity(rev, target, tok))

    tok2 = type(tok).from_pretrained(recipe.target.model)
    tok2.add_tokens(["<new>"])
    with pytest.raises(CacheMismatchError, match="tokenizer"):
        cache.validate(cache_identity(recipe, target, tok2))

    think = recipe.model_copy(deep=True)
    think.regeneration.thinking = True
    with pytest.raises(CacheMismatchError, match="chat template"):
        cache.validate(cache_identity(think, target, tok))


def test_trainer_refuses_mismatched_cache(env, tmp_path):
    from deepspec.train.trainer import Trainer

    recipe, tok, target, seqs = env
    _write(recipe, tok, target, seqs, str(tmp_path / "c"))
    bad = Recipe.model_validate(
        {**recipe.model_dump(), "target": {**recipe.target.model_dump(), "revision": "new"},
         "features": {"mode": "offline", "cache_path": str(tmp_path / "c")}}
    )  # fmt: skip
    with pytest.raises(CacheMismatchError, match="revision"):
        Trainer(bad, progress=False)


def test_corrupted_shard_is_detected(env, tmp_path):
    recipe, tok, target, seqs = env
    m = _write(recipe, tok, target, seqs, str(tmp_path / "c"))
    shard = tmp_path / "c" / m["shards"][1]["name"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    cache = FeatureCache(str(tmp_path / "c"))
    cache.features(0)  # shard 0 is fine
    bad_seq = m["shards"][1]["first_sequence"]
    with pytest.raises(CacheCorruptError, match=r"shard_00001.*corrupted"):
        cache.features(bad_seq)
    with pytest.raises(CacheCorruptError):
        FeatureCache(str(tmp_path / "c")).verify()


def test_incomplete_cache_is_refused(env, tmp_path):
    recipe, tok, target, seqs = env
    _write(recipe, tok, target, seqs, str(tmp_path / "c"))
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    m["complete"] = False
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="incomplete"):
        FeatureCache(str(tmp_path / "c"))


def test_refuses_to_start_without_space(env, tmp_path, monkeypatch):
    from deepspec.storage import LocalStore

    recipe, tok, target, seqs = env
    monkeypatch.setattr(LocalStore, "free_bytes", lambda self: 10_000)
    with pytest.raises(CacheError, match=r"not enough space.*needs about .* GiB.*GiB free"):
        _write(recipe, tok, target, seqs, str(tmp_path / "c"))
    assert not (tmp_path / "c" / "shards").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_roundtrip_with_moto_server(env, tmp_path, monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    recipe, tok, target, seqs = env
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for k, v in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(k, v)
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="feats")
        local = _write(recipe, tok, target, seqs, str(tmp_path / "local"))
        remote = _write(recipe, tok, target, seqs, "s3://feats/run1/cache", endpoint=endpoint)
        assert [e["sha256"] for e in remote["shards"]] == [e["sha256"] for e in local["shards"]]
        assert remote["content_hash"] == local["content_hash"]
        cache = FeatureCache("s3://feats/run1/cache", endpoint_url=endpoint)
        ref = FeatureCache(str(tmp_path / "local"))
        for i in (0, len(cache) - 1):
            torch.testing.assert_close(cache.features(i), ref.features(i), rtol=0, atol=0)
        # resuming a complete S3 cache is a no-op
        assert _write(recipe, tok, target, seqs, "s3://feats/run1/cache", endpoint=endpoint)["complete"]
    finally:
        server.stop()
    os.environ.pop("AWS_ENDPOINT_URL", None)
