"""Trainer options for small targets: micro-batches by token budget, the progress line (tokens/s and
MFU), and which draft blocks ``training.compile`` compiles (without running a compiled step: CPU)."""

from __future__ import annotations

from deepspec.config import Recipe
from deepspec.testing.tiny import tiny_recipe
from deepspec.train.trainer import Trainer


def _trainer(tmp_path, tiny_dir: str, tiny_data: str, algorithm: str = "dflash", **training) -> Trainer:
    section = {"max_steps": 2, "save_every": 2, **training}
    recipe = Recipe.model_validate(
        tiny_recipe(tiny_dir, tiny_data, str(tmp_path / "out"), algorithm, training=section)
    )
    return Trainer(recipe, device="cpu", progress=True)


def test_token_budget_micro_batches_and_progress_line(tmp_path, capsys, tiny_dir, tiny_data):
    trainer = _trainer(
        tmp_path, tiny_dir, tiny_data, global_batch_size=8, micro_batch_tokens=160, log_every=2
    )
    trainer.peak_flops = 1e9  # as if on a GPU of known peak, so that the progress line carries MFU
    seen: list[tuple[int, int, int]] = []  # (rows, padded length, real tokens) of every micro-batch
    fetch = trainer.features.batch

    def batch(indices):
        b = fetch(indices)
        seen.append((*b.input_ids.shape, int(b.attention_mask.sum())))
        return b

    trainer.features.batch = batch
    final = trainer.train()
    trainer.close()
    assert all(rows * t <= 160 or rows == 1 for rows, t, _ in seen), seen
    assert any(rows > 1 for rows, _, _ in seen)  # several sequences share a micro-batch
    assert final["tokens_seen"] == sum(real for _, _, real in seen)
    assert final["padding_fraction"] == 1 - sum(r for *_, r in seen) / sum(rows * t for rows, t, _ in seen)
    progress = capsys.readouterr().err
    assert "tok/s=" in progress and "mfu=" in progress


def test_compile_picks_the_draft_blocks_and_keeps_state_dict_names(tmp_path, tiny_dir, tiny_data):
    assert _trainer(tmp_path, tiny_dir, tiny_data, compile="auto").compiled == []  # off on CPU
    dflash = _trainer(tmp_path, tiny_dir, tiny_data, compile="on")
    assert dflash.compiled == ["hidden_norm", "layers.0", "norm"]  # a whole decoder layer is one unit
    eagle3 = _trainer(tmp_path, tiny_dir, tiny_data, "eagle3", compile="on")
    assert eagle3.compiled == [
        "midlayer.input_layernorm",
        "midlayer.hidden_norm",
        "midlayer.post_attention_layernorm",
        "midlayer.mlp",
        "norm",
    ]  # Eagle3 calls its layer's parts one by one: its norms and MLP are the units
    for trainer in (dflash, eagle3):
        assert not any("_orig_mod" in k for k in trainer.draft.state_dict())  # checkpoints keep their names
