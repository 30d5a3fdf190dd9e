"""Fixtures: a tiny target directory (model + char tokenizer) and regenerated conversations."""

from __future__ import annotations

import pytest

from deepspec.testing.tiny import save_tiny_target, write_tiny_regenerated


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    return save_tiny_target(str(tmp_path_factory.mktemp("tiny-llama")), "llama")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    return write_tiny_regenerated(str(tmp_path_factory.mktemp("data") / "regenerated.jsonl"), n=24)
