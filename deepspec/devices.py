"""Device choice and the torchrun process group, written once for every stage.

One rule for ``--device`` (train, features, eval, export, serve):

* ``None`` or ``"auto"``: ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``;
* ``"cuda"`` (no index): ``cuda:<LOCAL_RANK>``, so each torchrun process takes its own GPU;
* ``"cuda:N"`` / ``"cpu"`` / ``"mps"``: as written;
* a CUDA device on a machine without CUDA is an error naming the option, not a crash deep in a load.

The process group follows torchrun's RANK / LOCAL_RANK / WORLD_SIZE variables: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def local_rank_from_env() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def pick_device(pref: str | torch.device | None = None, local_rank: int | None = None) -> torch.device:
    """The device a process of this machine should use (rule in the module docstring)."""
    rank = local_rank_from_env() if local_rank is None else local_rank
    text = str(pref) if pref is not None else "auto"
    if text == "auto":
        return torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise ValueError(f"--device {text!r} is not a device: use cpu, cuda, cuda:N or auto") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text} requested but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", rank)
    return device


@dataclass
class DistInfo:
    """This process's place in the torchrun group (a single process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_pref: str | torch.device | None = None) -> tuple[DistInfo, torch.device]:
    """Read torchrun's environment, pick this process's device and start the process group."""
    info = DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=local_rank_from_env(),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )
    device = pick_device(device_pref, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device
