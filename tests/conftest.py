"""Shared fixtures: offline mode, the repository root and the shared data folder beside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = (REPO_ROOT.parent / "shared").resolve()


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs one worker per core): one torch thread per worker.

    Each worker's default of one thread per core would oversubscribe the cores the workers share; the
    programs that tests start inherit ``OMP_NUM_THREADS``.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)


# The test modules that use the real SmolLM2 weights (the ``integration`` marker). Under xdist they all run
# in one worker: they share session fixtures (the converted weights, the regenerated answers, the
# feature cache, the trained drafts) that each worker would otherwise build again, and only that worker
# converts the GGUF into the shared model cache. Collection fails if an integration test lives elsewhere.
SMOLLM2_MODULES = frozenset({
    "tests/eval/test_integration_smollm2.py",
    "tests/export/test_smollm2_export.py",
    "tests/integration/test_serve_regenerate_smollm2.py",
    "tests/train/test_learning.py",
})  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.nodeid.split("::")[0]
        if item.get_closest_marker("integration") and module not in SMOLLM2_MODULES:
            raise pytest.UsageError(
                f"{module} has integration tests (real SmolLM2): add it to SMOLLM2_MODULES in tests/conftest.py"
            )


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``-n N`` (``--dist load``): each test is its own work unit, except that the SmolLM2 modules form one.

    xdist's ``--dist loadgroup`` would do this through marks, but with pytest 9 its renaming of node ids
    no longer takes effect. The largest unit goes out first, so the SmolLM2 worker starts at once.
    """
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SmolLM2Together(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return "smollm2" if module in SMOLLM2_MODULES else nodeid

    return SmolLM2Together(config, log)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED}")
    return SHARED


# --------------------------------------------------------------------------------------------------
# The real SmolLM2 target, its own answers, and drafts trained on them: built once per session and
# shared by the learning test (tests/train), the trained-draft evaluation (tests/eval) and the exports
# (tests/export). The drafts train from one offline feature cache of the target, written once by
# `deepspec features --layers union` in float32: the 30-layer target then runs once per sequence
# (32 forwards) instead of once per sequence per step (3 x 160); that forward was ~60 % of a training
# step on CPU. tests/features shows that offline losses equal online ones.
# --------------------------------------------------------------------------------------------------

SMOLLM2_TRAIN_PROMPTS = 32
SMOLLM2_ANSWER_TOKENS = 64
SMOLLM2_TRAIN_STEPS = 40
SMOLLM2_DRAFTS = {
    "eagle3": {"ttt_steps": 3, "draft_vocab_size": 4096},
    "dflash": {"num_layers": 1, "num_anchors": 16, "block_size": 4},
    "dspark": {"num_layers": 1, "num_anchors": 16, "block_size": 4, "markov_rank": 32},
}


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's real tokenizer (from the packaged GGUF; no weights are converted for it)."""
    from deepspec.target_model.files import smollm2_tokenizer

    try:
        return smollm2_tokenizer()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from deepspec.target_model.files import resolve_model_path

    return resolve_model_path("smollm2")


@pytest.fixture(scope="session")
def smollm2_regenerated(tmp_path_factory, smollm2_path, shared_dir) -> str:
    """Greedy SmolLM2 answers to gsm8k-train prompts, so drafts learn the target's own outputs."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    prompts: list[str] = []
    with open(shared_dir / "datasets" / "train" / "prompts.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("domain") == "math" and len(rec["conversations"][0]["content"]) < 400:
                prompts.append(rec["conversations"][0]["content"])
            if len(prompts) == SMOLLM2_TRAIN_PROMPTS:
                break
    out = tmp_path_factory.mktemp("smollm2-regen") / "regenerated.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for start in range(0, len(prompts), 16):  # batched greedy generate: far cheaper than one by one
            chunk = prompts[start : start + 16]
            texts = [
                tok.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in chunk
            ]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    max_new_tokens=SMOLLM2_ANSWER_TOKENS,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            for i, p in enumerate(chunk):
                answer = tok.decode(gen[i, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": answer}]
                f.write(json.dumps({"id": f"m{start + i}", "status": "ok", "messages": msgs}) + "\n")
    return str(out)


def smollm2_recipe_dict(model_path: str, data: str, algorithm: str, output_dir: Path, cache: Path) -> dict:
    """The small CPU recipe every SmolLM2 training test uses (features read from ``cache``)."""
    return {
        "target": {"model": model_path},
        "data": {"max_length": 128},
        "regeneration": {"output": data},
        "features": {"mode": "offline", "cache_path": str(cache), "storage_dtype": "float32"},
        "draft": {"algorithm": algorithm, **SMOLLM2_DRAFTS[algorithm]},
        "training": {"output_dir": str(output_dir), "lr": 3e-3, "warmup_ratio": 0.05,
                     "global_batch_size": 4, "micro_batch_size": 4, "max_steps": SMOLLM2_TRAIN_STEPS,
                     "log_every": 1, "save_every": SMOLLM2_TRAIN_STEPS, "precision": "fp32"},
        "evaluation": {"benchmarks": ["gsm8k"], "max_prompts": 3, "temperature": 0.0, "max_new_tokens": 48},
    }  # fmt: skip


@pytest.fixture(scope="session")
def smollm2_features(tmp_path_factory, smollm2_path, smollm2_regenerated) -> Path:
    """SmolLM2's features of the regenerated data for all three drafts, written by ``deepspec features``."""
    import yaml

    from deepspec.cli import main

    base = tmp_path_factory.mktemp("smollm2-features")
    cache = base / "cache"
    recipe = base / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            smollm2_recipe_dict(smollm2_path, smollm2_regenerated, "eagle3", base / "unused", cache)
        )
    )
    assert main(["features", "-c", str(recipe), "--layers", "union", "--device", "cpu"]) == 0
    return cache


@pytest.fixture(scope="session")
def smollm2_trained(tmp_path_factory, smollm2_path, smollm2_regenerated, smollm2_features):
    """``smollm2_trained(algorithm) -> (recipe, output_dir)``: trains each algorithm at most once."""
    from deepspec.config import Recipe
    from deepspec.train.trainer import Trainer

    runs: dict[str, tuple] = {}

    def get(algorithm: str):
        if algorithm not in runs:
            out = tmp_path_factory.mktemp(f"smollm2-{algorithm}")
            recipe = Recipe.model_validate(
                smollm2_recipe_dict(smollm2_path, smollm2_regenerated, algorithm, out, smollm2_features)
            )
            Trainer(recipe, device="cpu", progress=False).train()
            runs[algorithm] = (recipe, out)
        return runs[algorithm]

    return get


# --------------------------------------------------------------------------------------------------
# Tiny random targets on disk (tests/target, tests/train)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """A tiny random Llama target saved with a character tokenizer."""
    from deepspec.testing.tiny import save_tiny_target

    return save_tiny_target(str(tmp_path_factory.mktemp("tiny-llama")), "llama")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """24 regenerated conversations for the tiny target."""
    from deepspec.testing.tiny import write_tiny_regenerated

    return write_tiny_regenerated(str(tmp_path_factory.mktemp("data") / "regenerated.jsonl"), n=24)


# --------------------------------------------------------------------------------------------------
# S3 through moto's server mode (a real HTTP endpoint speaking the S3 API, on loopback).
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_s3_endpoint():
    """A moto S3 server on 127.0.0.1 for the whole session; yields its endpoint URL.

    Credentials and region are dummy values set in the environment for boto3; each test creates its
    own bucket (names must differ between tests).
    """
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
