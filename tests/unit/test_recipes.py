"""Recipes: every shipped recipe loads; bad values and unknown keys give one clear error each."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepspec.cli import main
from deepspec.config import Recipe, RecipeError, apply_overrides, load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs").rglob("*.yaml"))


def test_recipes_are_shipped() -> None:
    assert RECIPES, "configs/ has no recipes"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_unknown_key_is_named_with_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "training:\n  lr: 1e-4\n  learning_rate: 3\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg
    assert "training.learning_rate: unknown key" in msg
    assert msg.count("\n  ") == 1  # exactly one error line


def test_unknown_section_is_named(tmp_path: Path) -> None:
    p = _write(tmp_path, "trainig:\n  lr: 1e-4\n")
    with pytest.raises(RecipeError, match=r"trainig: unknown key"):
        load_recipe(p)


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    p = _write(tmp_path, "regeneration:\n  sampling:\n    temperature: hot\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert "regeneration.sampling.temperature" in str(e.value)
    assert "'hot'" in str(e.value)


def test_out_of_range_and_bad_literal(tmp_path: Path) -> None:
    p = _write(tmp_path, "draft:\n  algorithm: medusa\ntraining:\n  lr: -1\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "draft.algorithm" in msg and "'medusa'" in msg
    assert "training.lr" in msg


def test_invalid_yaml_names_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "training: [unclosed\n")
    with pytest.raises(RecipeError, match="invalid YAML in"):
        load_recipe(p)


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(_write(tmp_path, "- a\n- b\n"))


def test_missing_file() -> None:
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("/nonexistent/recipe.yaml")


def test_cross_field_rule() -> None:
    with pytest.raises(RecipeError, match="cache_path is required"):
        load_recipe(None, ["features.mode=offline"])


def test_dotted_overrides_parse_yaml_values() -> None:
    r = load_recipe(
        None,
        [
            "training.lr=3e-4",
            "regeneration.endpoints=[http://a/v1, http://b/v1]",
            "regeneration.thinking=false",
        ],
    )
    assert r.training.lr == pytest.approx(3e-4)
    assert r.regeneration.endpoints == ["http://a/v1", "http://b/v1"]
    assert r.regeneration.thinking is False


def test_override_of_unknown_key_is_reported() -> None:
    with pytest.raises(RecipeError, match=r"training.lrr: unknown key"):
        load_recipe(None, ["training.lrr=1"])


def test_override_into_scalar_is_rejected() -> None:
    with pytest.raises(RecipeError, match="is not a section"):
        apply_overrides({"training": {"lr": 1}}, ["training.lr.x=2"])


def test_cli_reports_recipe_errors_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _write(tmp_path, "training:\n  lrr: 1\n")
    assert main(["recipe", "validate", str(p)]) == 2
    assert "training.lrr: unknown key" in capsys.readouterr().err


def test_schema_has_descriptions() -> None:
    from deepspec.config import recipe_json_schema

    schema = recipe_json_schema()
    target = schema["$defs"]["TargetConfig"]["properties"]["model"]
    assert target["description"]


# --------------------------------------------------------------------------------------------------
# Per-algorithm draft settings (a union keyed on draft.algorithm)
# --------------------------------------------------------------------------------------------------


def test_dflash_recipe_with_ttt_steps_is_rejected_naming_the_field(tmp_path: Path) -> None:
    p = _write(tmp_path, "draft:\n  algorithm: dflash\n  ttt_steps: 5\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "draft.ttt_steps does not apply to algorithm 'dflash'" in msg and "eagle3" in msg
    assert msg.count("\n  ") == 1


@pytest.mark.parametrize(
    ("algorithm", "key", "owner"),
    [("eagle3", "block_size", "dflash and dspark"), ("dflash", "markov_rank", "dspark"),
     ("eagle3", "draft_vocab_size", "eagle3")],
)  # fmt: skip
def test_settings_of_other_algorithms_are_rejected(algorithm: str, key: str, owner: str) -> None:
    if owner == algorithm:  # its own setting: accepted
        assert (
            getattr(load_recipe(None, [f"draft.algorithm={algorithm}", f"draft.{key}=64"]).draft, key) == 64
        )
        return
    with pytest.raises(
        RecipeError, match=rf"draft\.{key} does not apply to algorithm '{algorithm}'.*{owner}"
    ):
        load_recipe(None, [f"draft.algorithm={algorithm}", f"draft.{key}=4"])


def test_draft_settings_are_typed_per_algorithm() -> None:
    from deepspec.config import DFlashDraftConfig, DSparkDraftConfig, Eagle3DraftConfig

    assert isinstance(load_recipe().draft, Eagle3DraftConfig)  # the default algorithm
    assert isinstance(load_recipe(None, ["draft.ttt_steps=3"]).draft, Eagle3DraftConfig)
    dflash = load_recipe(None, ["draft.algorithm=dflash"]).draft
    assert isinstance(dflash, DFlashDraftConfig) and dflash.block_size == 8  # anchor + 7 proposals
    dspark = load_recipe(None, ["draft.algorithm=dspark"]).draft
    assert isinstance(dspark, DSparkDraftConfig) and dspark.block_size == 7  # 7 slots, each proposes


@pytest.mark.parametrize("ids", [[9, 1, 17], [1, 9, 9, 17], [-1, 3]])
def test_layer_ids_must_be_ascending_and_unique(ids: list[int]) -> None:
    with pytest.raises(RecipeError, match=r"draft\.target_layer_ids"):
        load_recipe(None, [f"draft.target_layer_ids={ids}"])
    assert load_recipe(None, ["draft.target_layer_ids=[1, 9, 17]"]).draft.target_layer_ids == [1, 9, 17]
