"""Exact resume: N steps straight == k steps, SIGKILL, resume to N (bit-identical weights), on one
process and on 2-process DDP (gloo, torchrun). Plus the checkpoint layout, keep-last-K, the logs, and
``tokens_seen``: the real (non-padding) tokens of every rank, also across a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .launch import real_tokens, train, train_and_kill_after, weights, write_recipe

N, K = 6, 3


@pytest.mark.parametrize(("algorithm", "world"), [("eagle3", 1), ("dspark", 2)])
def test_exact_resume_after_sigkill(tmp_path, tiny_dir, tiny_data, algorithm, world):
    overrides = {"max_steps": N, "save_every": K, "global_batch_size": 4}
    straight = write_recipe(tmp_path, "straight", tiny_dir, tiny_data, algorithm, **overrides)
    train(straight, world)
    killed = write_recipe(tmp_path, "killed", tiny_dir, tiny_data, algorithm, **overrides)
    train_and_kill_after(killed, world, tmp_path / "killed", K)
    assert not (tmp_path / "killed" / f"step_{N}").exists()
    train(killed, world)  # resumes from step_K
    a, b = weights(tmp_path / "straight", N), weights(tmp_path / "killed", N)
    assert a.keys() == b.keys() and a
    for name in a:
        assert (a[name] == b[name]).all(), f"{name} differs after resume"
    # the resumed run logged only the remaining steps (no step trained twice)
    rows = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, N + 1))
    for r in range(world):
        assert (tmp_path / "killed" / f"step_{N}" / f"rng_rank{r}.pt").is_file()
    _check_layout_and_logs(tmp_path / "straight")
    # tokens_seen: every rank's real tokens, counted once per micro-batch, carried over by the resume
    expected = real_tokens(straight, N)
    for out in ("straight", "killed"):
        cfg = json.loads((tmp_path / out / f"step_{N}" / "config.json").read_text())
        assert cfg["deepspec_training"]["tokens_seen"] == expected, out
    assert rows[-1]["tokens_seen"] == expected
    assert rows[K - 1]["tokens_seen"] == real_tokens(straight, K)


def _check_layout_and_logs(out: Path) -> None:
    assert (out / "latest").read_text().strip() == f"step_{N}" and not (out / "latest").is_symlink()
    assert sorted(p.name for p in out.glob("step_*")) == [f"step_{K}", f"step_{N}"]  # keep_last=2
    step = out / f"step_{N}"
    for name in ("config.json", "model.safetensors", "trainer_state.pt", "optimizer/.metadata"):
        assert (step / name).is_file(), name
    cfg = json.loads((step / "config.json").read_text())
    assert cfg["deepspec_training"]["step"] == N and "architectures" in cfg
    w = weights(out, N)
    assert not any("embed_tokens" in k for k in w)  # frozen target parts are not saved
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "tau", "acceptance", "tokens_seen"):
        assert key in rows[-1], key
    assert rows[-1]["tau"] >= 1.0
    assert any((out / "tensorboard").iterdir())
