"""Checkpoints: ``<out>/step_<N>/`` (config.json + model.safetensors + trainer_state_rank<r>.pt) + ``latest``.

* ``model.safetensors`` holds the draft's trainable weights only (never the target's embedding / LM head),
  in fp32 (the master weights), so a resumed run continues bit-exactly.
* ``trainer_state_rank<r>.pt`` holds what only that rank knows: optimizer and scheduler state, RNG
  states (python, numpy, torch CPU and CUDA), the data position and counters.
* A checkpoint is assembled in ``step_<N>.tmp/`` and renamed into place by rank 0 once every rank has
  written its part; then ``latest`` (a small text file, not a symlink: PVCs and object stores) is
  replaced atomically. Older ``step_*`` folders beyond ``keep_last`` are removed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The folder named by ``<out>/latest`` (None when there is none)."""
    pointer = Path(out_dir) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    path = Path(out_dir) / name
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{pointer} names {name!r} but {path}/model.safetensors is missing")
    return path


class Checkpointer:
    """Writes and reads trainer checkpoints for one rank."""

    def __init__(self, out_dir: str | Path, rank: int, world_size: int, keep_last: int, barrier=None):
        self.out = Path(out_dir)
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self._barrier = barrier or (lambda: None)

    def save(
        self,
        step: int,
        config: dict[str, Any],
        weights: dict[str, torch.Tensor] | None,
        trainer_state: dict[str, Any],
    ) -> Path:
        """Write step ``step``; ``weights`` are needed on rank 0 only (other ranks may pass None)."""
        from safetensors.torch import save_file

        final = self.out / f"step_{step}"
        tmp = self.out / f"step_{step}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        torch.save(trainer_state, tmp / f"trainer_state_rank{self.rank}.pt")
        if self.rank == 0:
            assert weights is not None
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        self._barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _write_atomic(self.out / LATEST, f"{final.name}\n")
            for _, old in list_checkpoints(self.out)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def load(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(weights, this rank's trainer state) from a checkpoint folder."""
        from safetensors.torch import load_file

        state_file = path / f"trainer_state_rank{self.rank}.pt"
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{state_file} is missing: the checkpoint was written with a different world size "
                f"(now {self.world_size}); resume with the same number of processes"
            )
        weights = load_file(str(path / "model.safetensors"))
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        return weights, state
