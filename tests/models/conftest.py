"""Fixtures for draft-model tests (tiny random Llama / Qwen3 targets)."""

from __future__ import annotations

import pytest

from .draft_helpers import ARCHS, make_target


@pytest.fixture(scope="module", params=ARCHS)
def target(request):
    return make_target(request.param)


@pytest.fixture(scope="module")
def llama_target():
    return make_target("llama")
