"""Running ``deepspec train`` as a user does (one process, or torchrun with gloo on CPU) from tests.

Also: a kill at a known checkpoint (the trainer blocks after writing it, see ``PAUSE_ENV``), and the
real-token count the run must report, computed from the data and the sampler's schedule.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

from deepspec.testing.tiny import tiny_recipe
from deepspec.train.trainer import PAUSE_ENV


def write_recipe(
    tmp_path: Path, name: str, tiny_dir: str, tiny_data: str, algorithm: str, **training
) -> Path:
    """A tiny recipe whose checkpoints go to ``tmp_path/name``; ``training`` overrides that section."""
    r = tiny_recipe(tiny_dir, tiny_data, str(tmp_path / name), algorithm=algorithm, training=training)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def train_cmd(recipe: Path, world: int) -> list[str]:
    base = ["-m", "deepspec.cli", "train", "-c", str(recipe), "--no-progress", "--device", "cpu"]
    if world == 1:
        return [sys.executable, *base]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *base]


def train_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    if PAUSE_ENV not in extra:
        env.pop(PAUSE_ENV, None)
    return env


def train(recipe: Path, world: int) -> None:
    proc = subprocess.run(
        train_cmd(recipe, world), env=train_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def train_here(recipe: Path) -> None:
    """``deepspec train`` on one process inside the test's interpreter (no interpreter start-up).

    For runs whose weights are not compared bit for bit with a run of another thread setting.
    """
    from deepspec.cli import main

    assert main(["train", "-c", str(recipe), "--no-progress", "--device", "cpu"]) == 0


def _descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def train_and_kill_after(recipe: Path, world: int, out: Path, step: int) -> None:
    """Start training, wait until `latest` names step_<step> (the trainer then blocks), SIGKILL the group."""
    proc = subprocess.Popen(train_cmd(recipe, world), env=train_env(**{PAUSE_ENV: str(step)}),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    latest = out / "latest"
    deadline = time.monotonic() + 240
    try:
        while not (latest.is_file() and latest.read_text().strip() == f"step_{step}"):
            assert proc.poll() is None, f"trainer exited early: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "checkpoint never appeared"
            time.sleep(0.05)  # polling for the pointer file, not waiting for luck
    finally:
        for pid in [proc.pid, *_descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def weights(out: Path, step: int) -> dict:
    return load_file(str(out / f"step_{step}" / "model.safetensors"))


def real_tokens(recipe_path: Path, steps: int) -> int:
    """Non-padding tokens of the first ``steps`` global batches, summed over the whole batch.

    Computed from the tokenized data and the sampler's schedule (which sequences each step takes);
    independent of the world size, since every step takes the same global batch.
    """
    from transformers import AutoTokenizer

    from deepspec.config import load_recipe
    from deepspec.data.sequences import ResumableBatchSampler, load_sequences

    recipe = load_recipe(str(recipe_path), [])
    tokenizer = AutoTokenizer.from_pretrained(recipe.target.model)
    lengths = [int(s.input_ids.numel()) for s in load_sequences(recipe, tokenizer)]
    tc = recipe.training
    sampler = ResumableBatchSampler(lengths, tc.global_batch_size, tc.micro_batch_size, seed=tc.seed)
    return sum(lengths[i] for _ in range(steps) for mb in sampler.next_global_batch() for i in mb)
