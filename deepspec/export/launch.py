"""The SGLang and vLLM command lines that serve an export, printed by ``deepspec export`` and in its README.

Algorithm names: SGLang ``--speculative-algorithm EAGLE3 | DFLASH | DSPARK``; vLLM ``--speculative-config``
``method`` ``eagle3 | dflash | dspark`` (the proposers assert these names: ``v1/spec_decode/dflash.py`` and
``dspark.py``, see :mod:`.engines`). Proposal counts follow the export: DFlash proposes ``block_size - 1``
tokens per block, DSpark ``block_size``, Eagle3 the evaluation's ``num_proposals`` steps.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from deepspec.export.engines import ACCEPTED


def proposals(cfg: dict[str, Any], algorithm: str, eagle3_steps: int = 7) -> int:
    block = int((cfg.get("dflash_config") or {}).get("block_size") or cfg.get("block_size") or 0)
    return {"eagle3": eagle3_steps, "dflash": block - 1, "dspark": block}[algorithm]


def launch_lines(
    cfg: dict[str, Any], engine: str, export_dir: str, target: str, eagle3_steps: int = 7
) -> str:
    """The command that serves ``target`` with this export on ``engine``."""
    algorithm = ACCEPTED[engine][cfg["architectures"][0]]
    n = proposals(cfg, algorithm, eagle3_steps)
    q = shlex.quote
    if engine == "sglang":
        line = (
            f"python -m sglang.launch_server --model-path {q(target)} --speculative-algorithm "
            f"{algorithm.upper()} --speculative-draft-model-path {q(export_dir)}"
        )
        if algorithm == "eagle3":
            line += f" --speculative-num-steps {n} --speculative-eagle-topk 1 --speculative-num-draft-tokens {n + 1}"
        elif algorithm == "dflash":  # the verify block is [anchor, block_size - 1 proposals]
            line += f" --speculative-num-draft-tokens {n + 1}"
        return line
    spec = json.dumps({"method": algorithm, "model": export_dir, "num_speculative_tokens": n})
    return f"vllm serve {q(target)} --speculative-config {q(spec)}"


def readme(cfg: dict[str, Any], engine: str, line: str) -> str:
    arch = cfg["architectures"][0]
    info = cfg.get("deepspec", {})
    return (
        f"# {arch} draft for {engine}\n\n"
        f"Exported by deepspec ({info.get('algorithm', '')}; slot convention: "
        f"{info.get('slot_convention', 'autoregressive')}). Checked with `deepspec export --check {engine} .`\n\n"
        f"Serve it:\n\n```\n{line}\n```\n\n"
        f"Export provenance:\n\n```json\n{json.dumps(info.get('export', {}), indent=2)}\n```\n"
    )
