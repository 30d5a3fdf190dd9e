"""Checkpoints: ``<out>/step_<N>/`` + ``<out>/latest``, in a local folder or under an ``s3://`` prefix.

A step folder holds the same files whatever the world size and the parallelism (none, DDP, FSDP2):

* ``config.json``: the draft's HF-style config, with a ``deepspec_training`` section (step, tokens,
  world size, recipe).
* ``model.safetensors``: the draft's trainable weights in full, in fp32 (the master weights; FSDP2
  shards are gathered first), never the target's embedding / LM head. Resuming loads it into the
  unsharded draft, so any world size can resume it, and eval/export read it as is.
* ``trainer_state.pt`` (rank 0): step, tokens seen, scheduler, the sampler's data position, and the
  world size that wrote it.
* ``rng_rank<r>.pt``: each rank's RNG states (python, numpy, torch CPU and CUDA).
* ``optimizer/``: the optimizer state as a :mod:`torch.distributed.checkpoint` folder (each rank
  writes its shard under FSDP2). DCP reshards on load, so a checkpoint written by N processes
  resumes on M.

Local: a checkpoint is assembled in ``step_<N>.tmp/`` and renamed into place by rank 0 once every
rank has written its part. S3: every rank writes into a local staging folder and uploads its files
under ``step_<N>/``. Either way ``latest`` (a small text file, not a symlink: PVCs and object
stores) is replaced last, so it never names a partial checkpoint. Older ``step_*`` beyond
``keep_last`` are removed.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepspec.layout import LATEST, upload_folder
from deepspec.storage import S3Store, atomic_write_json, atomic_write_text, is_s3, join

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d+)$")
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.pt"
OPTIMIZER_DIR = "optimizer"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


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


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the finished ``step_<N>`` folders of a local output folder, oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(found)


@dataclass
class LoadedCheckpoint:
    """What a rank reads back from a step folder (downloaded first when it lives on S3)."""

    path: Path  # local folder
    weights: dict[str, torch.Tensor]
    trainer_state: dict[str, Any]
    rng: dict[str, Any] | None  # None: the writing run had no rank of this number

    @property
    def optimizer_dir(self) -> Path:
        return self.path / OPTIMIZER_DIR


class Checkpointer:
    """Writes and reads trainer checkpoints for one rank (call :meth:`save` on every rank)."""

    def __init__(
        self,
        location: str,
        rank: int,
        world_size: int,
        keep_last: int,
        barrier: Callable[[], None] | None = None,
        endpoint_url: str | None = None,
    ):
        self.location = str(location)
        self.remote = is_s3(self.location)
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.endpoint_url = endpoint_url
        self._barrier = barrier or (lambda: None)

    # ---- writing --------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        config: dict[str, Any] | None,
        weights: dict[str, torch.Tensor] | None,
        trainer_state: dict[str, Any] | None,
        write_optimizer: Callable[[Path], None],
    ) -> str:
        """Write step ``step``; returns its location.

        ``config``, ``weights`` and ``trainer_state`` are needed on rank 0 only (other ranks pass None).
        ``write_optimizer(folder)`` runs on every rank (a collective :func:`torch.distributed.checkpoint.save`).
        """
        from safetensors.torch import save_file

        name = f"step_{step}"
        if self.remote:
            staging = Path(tempfile.mkdtemp(prefix=f"deepspec-ckpt-{name}-r{self.rank}-"))
        else:
            staging = Path(self.location) / f"{name}.tmp"
            if self.rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            self._barrier()
        torch.save(rng_state(), staging / rng_file(self.rank))
        write_optimizer(staging / OPTIMIZER_DIR)
        if self.rank == 0:
            assert weights is not None and config is not None and trainer_state is not None
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
            save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
            torch.save(trainer_state, staging / TRAINER_STATE)
            atomic_write_json(staging / CONFIG, config)
        if self.remote:
            upload_folder(staging, join(self.location, name), self.endpoint_url)
            shutil.rmtree(staging, ignore_errors=True)
        self._barrier()  # every rank's files are in place
        if self.rank == 0:
            self._publish(name, staging)
        self._barrier()
        return join(self.location, name)

    def _publish(self, name: str, staging: Path) -> None:
        """Rank 0: make ``name`` the latest checkpoint, then drop the oldest beyond ``keep_last``."""
        if self.remote:
            store = S3Store(self.location, self.endpoint_url)
            store.write_text(LATEST, f"{name}\n")
            steps = sorted({int(m.group(1)) for n in store.list() if (m := _STEP_RE.match(n.split("/")[0]))})
            for old in steps[: -self.keep_last]:
                for obj in store.list(f"step_{old}/"):
                    store.delete(obj)
            return
        out = Path(self.location)
        final = out / name
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        atomic_write_text(out / LATEST, f"{name}\n")
        for _, old in list_checkpoints(out)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def upload_logs(self, local_dir: Path) -> None:
        """S3 only (rank 0): copy the run's logs (metrics.jsonl, tensorboard/) next to the checkpoints."""
        if self.remote:
            upload_folder(local_dir, self.location, self.endpoint_url)

    def download_logs(self, local_dir: Path, names: tuple[str, ...] = ("metrics.jsonl",)) -> None:
        """S3 only: bring back logs a previous run uploaded, unless ``local_dir`` already has them."""
        if not self.remote:
            return
        store = S3Store(self.location, self.endpoint_url)
        for name in names:
            dest = local_dir / name
            if not dest.exists() and store.exists(name):
                dest.parent.mkdir(parents=True, exist_ok=True)
                store.client.download_file(store.bucket, store.key(name), str(dest))

    # ---- reading --------------------------------------------------------------------------------

    def latest(self) -> str | None:
        """Location of the step folder named by ``latest`` (None when there is none)."""
        if self.remote:
            store = S3Store(self.location, self.endpoint_url)
            if not store.exists(LATEST):
                return None
            name = store.read_text(LATEST).strip()
            if not store.exists(f"{name}/{WEIGHTS}"):
                raise FileNotFoundError(
                    f"{self.location}/{LATEST} names {name!r} but {name}/{WEIGHTS} is missing"
                )
            return join(self.location, name)
        pointer = Path(self.location) / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        path = Path(self.location) / name
        if not (path / WEIGHTS).is_file():
            raise FileNotFoundError(f"{pointer} names {name!r} but {path}/{WEIGHTS} is missing")
        return str(path)

    def load(self, location: str) -> LoadedCheckpoint:
        """Weights, trainer state and this rank's RNG state of a step folder (any world size wrote it)."""
        from safetensors.torch import load_file

        path = self._local(location)
        state_file = path / TRAINER_STATE
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{state_file} is missing: {location} was not written by this version of deepspec train "
                "(expected config.json, model.safetensors, trainer_state.pt, rng_rank<r>.pt, optimizer/)"
            )
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        rng = path / rng_file(self.rank)
        return LoadedCheckpoint(
            path=path,
            weights=load_file(str(path / WEIGHTS)),
            trainer_state=state,
            rng=torch.load(rng, map_location="cpu", weights_only=False) if rng.is_file() else None,
        )

    def _local(self, location: str) -> Path:
        """A local copy of a step folder: the folder itself, or a per-rank download of an S3 prefix."""
        if not is_s3(location):
            return Path(location)
        store = S3Store(location, self.endpoint_url)
        dest = Path(tempfile.mkdtemp(prefix=f"deepspec-resume-r{self.rank}-"))
        for name in store.list():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            store.client.download_file(store.bucket, store.key(name), str(target))
        return dest
