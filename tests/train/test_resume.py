"""Exact resume: N steps straight == k steps, SIGKILL, resume to N (bit-identical weights), on one
process and on 2-process DDP (gloo, torchrun). Plus checkpoint layout, keep-last-K and logs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from deepspec.testing.tiny import tiny_recipe
from deepspec.train.trainer import PAUSE_ENV

N, K = 6, 3


def _recipe(tmp_path: Path, name: str, tiny_dir: str, tiny_data: str, algorithm: str, world: int) -> Path:
    r = tiny_recipe(tiny_dir, tiny_data, str(tmp_path / name), algorithm=algorithm,
                    training={"max_steps": N, "save_every": K, "global_batch_size": 4})  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _cmd(recipe: Path, world: int) -> list[str]:
    base = ["-m", "deepspec.cli", "train", "-c", str(recipe), "--no-progress", "--device", "cpu"]
    if world == 1:
        return [sys.executable, *base]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *base]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    env.pop(PAUSE_ENV, None) if PAUSE_ENV not in extra else None
    return env


def _run(recipe: Path, world: int) -> None:
    proc = subprocess.run(_cmd(recipe, world), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


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


def _run_and_kill_after(recipe: Path, world: int, out: Path, step: int) -> None:
    """Start training, wait until `latest` names step_<step> (the trainer then blocks), SIGKILL the group."""
    proc = subprocess.Popen(_cmd(recipe, world), env=_env(**{PAUSE_ENV: str(step)}), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
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
    assert not (out / f"step_{N}").exists()


def _weights(out: Path) -> dict:
    return load_file(str(out / f"step_{N}" / "model.safetensors"))


@pytest.mark.parametrize(("algorithm", "world"), [("eagle3", 1), ("dspark", 2)])
def test_exact_resume_after_sigkill(tmp_path, tiny_dir, tiny_data, algorithm, world):
    straight = _recipe(tmp_path, "straight", tiny_dir, tiny_data, algorithm, world)
    _run(straight, world)
    killed = _recipe(tmp_path, "killed", tiny_dir, tiny_data, algorithm, world)
    _run_and_kill_after(killed, world, tmp_path / "killed", K)
    _run(killed, world)  # resumes from step_K
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and a
    for name in a:
        assert (a[name] == b[name]).all(), f"{name} differs after resume"
    # the resumed run logged only the remaining steps (no step trained twice)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, N + 1))
    for r in range(world):
        assert (tmp_path / "killed" / f"step_{N}" / f"trainer_state_rank{r}.pt").is_file()
    _check_layout_and_logs(tmp_path / "straight")


def _check_layout_and_logs(out: Path) -> None:
    assert (out / "latest").read_text().strip() == f"step_{N}" and not (out / "latest").is_symlink()
    assert sorted(p.name for p in out.glob("step_*")) == [f"step_{K}", f"step_{N}"]  # keep_last=2
    cfg = json.loads((out / f"step_{N}" / "config.json").read_text())
    assert cfg["deepspec_training"]["step"] == N and "architectures" in cfg
    weights = load_file(str(out / f"step_{N}" / "model.safetensors"))
    assert not any("embed_tokens" in k for k in weights)  # frozen target parts are not saved
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "tau", "acceptance"):
        assert key in rows[-1], key
    assert rows[-1]["tau"] >= 1.0
    assert any((out / "tensorboard").iterdir())
