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
