"""Tokenizers for the template tests: SmolLM2's real one (tests/conftest.py) and a Qwen3-style variant."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

QWEN3_LIKE = (Path(__file__).parent / "fixtures" / "qwen3_like.jinja").read_text()


@pytest.fixture(scope="module")
def qwen3_tokenizer(smollm2_tokenizer):
    """SmolLM2's tokenizer with a Qwen3-style template (thinking switch, think blocks dropped in history)."""
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = QWEN3_LIKE
    return tok
