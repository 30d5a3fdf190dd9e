"""data.holdout: a seeded-by-id held-out slice that training never sees (checkpoint selection's prompts)."""

from __future__ import annotations

import random

import pytest

from deepspec.config import Recipe, RecipeError, load_recipe
from deepspec.data.sequences import holdout_count, load_sequences, load_training_records, split_holdout


def _records(n: int) -> list[dict]:
    return [{"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(n)]


def test_split_is_by_id_not_by_position():
    records = _records(50)
    train, held = split_holdout(records, 5)
    assert len(held) == 5 and len(train) == 45
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in held)
    assert [r["id"] for r in held] != ["r0", "r1", "r2", "r3", "r4"]  # not the file's first lines
    shuffled = list(records)
    random.Random(1).shuffle(shuffled)
    _, held_again = split_holdout(shuffled, 5)
    assert {r["id"] for r in held_again} == {r["id"] for r in held}  # same set whatever the order


def test_count_fraction_and_limits():
    assert holdout_count(0, 10) == 0
    assert holdout_count(0.1, 100) == 10
    assert holdout_count(0.001, 100) == 1  # a positive fraction holds out at least one record
    assert holdout_count(7, 100) == 7
    with pytest.raises(ValueError, match="leaving none to train on"):
        holdout_count(10, 10)


def test_recipe_rejects_a_fractional_count():
    with pytest.raises(RecipeError, match="whole count"):
        load_recipe(None, ["data.holdout=2.5"])
    assert Recipe.model_validate({"data": {"holdout": 0.02}}).data.holdout == 0.02


def test_training_sequences_exclude_the_held_out_records(tiny_dir, tiny_data, tmp_path):
    from deepspec.testing.tiny import tiny_recipe, tiny_tokenizer

    recipe = Recipe.model_validate(tiny_recipe(tiny_dir, tiny_data, str(tmp_path / "out")))
    everything = {s.id for s in load_sequences(recipe, tiny_tokenizer())}
    recipe.data.holdout = 4
    trained = {s.id for s in load_sequences(recipe, tiny_tokenizer())}
    _, held = split_holdout(load_training_records(tiny_data), 4)
    assert len(held) == 4
    assert trained == everything - {r["id"] for r in held}


def test_selection_prompts_are_the_held_out_records(tiny_dir, tiny_data, tmp_path):
    from deepspec.eval.select import SelectionError, held_out_prompts
    from deepspec.layout import RunLayout
    from deepspec.testing.tiny import tiny_recipe

    recipe = Recipe.model_validate(tiny_recipe(tiny_dir, tiny_data, str(tmp_path / "out")))
    with pytest.raises(SelectionError, match=r"data\.holdout is 0: no prompts were held out"):
        held_out_prompts(recipe, RunLayout.from_recipe(recipe))
    recipe.data.holdout = 5
    prompts = held_out_prompts(recipe, RunLayout.from_recipe(recipe), max_prompts=3)
    _, held = split_holdout(load_training_records(tiny_data), 5)
    assert [p.turns[0] for p in prompts] == [r["messages"][0]["content"] for r in held][:3]
    assert [p.index for p in prompts] == [0, 1, 2] and {p.benchmark for p in prompts} == {"holdout"}
