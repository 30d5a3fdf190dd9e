"""Fixtures: SmolLM2's real tokenizer (from the packaged GGUF; no weights are converted for it)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_smollm2_tokenizer():
    """The cached converted directory's tokenizer when present, else read straight from the GGUF file."""
    from transformers import AutoTokenizer

    from deepspec.target.files import cache_root, smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cached = sorted((cache_root() / "models").glob(f"{gguf.stem}-*/tokenizer.json"))
    if cached:
        return AutoTokenizer.from_pretrained(cached[0].parent)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    return load_smollm2_tokenizer()
