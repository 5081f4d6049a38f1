"""Recipe loading: types, unknown keys, overrides, path anchoring and cross-field rules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmtune.config.loader import load_recipe
from llmtune.config.vocab import TASKS
from llmtune.errors import LlmtuneError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_shipped_recipes_load():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.task in TASKS, path
        if recipe.data.train_file:  # relative paths resolve from the recipe's folder to a real file
            assert Path(recipe.data.train_file).is_file(), (path, recipe.data.train_file)


def test_misspelled_key_is_an_error_with_a_suggestion(tmp_path):
    path = write(tmp_path, "training:\n  learning_rat: 1e-4\ndata:\n  train_file: x.jsonl\n")
    with pytest.raises(LlmtuneError, match=r"Unknown recipe key 'training.learning_rat'.*Did you mean \"learning_rate\""):
        load_recipe(path)


def test_misspelled_section_is_an_error(tmp_path):
    with pytest.raises(LlmtuneError, match=r"'trainig'.*Did you mean \"training\""):
        load_recipe(write(tmp_path, "trainig:\n  epochs: 1\n"))


def test_misspelled_override_is_an_error():
    with pytest.raises(LlmtuneError, match=r"'training.epoch'.*Did you mean \"epochs\""):
        load_recipe({"data": {"train_file": "a.jsonl"}}, ["training.epoch=2"])


def test_wrong_type_names_field_value_and_expected_type():
    with pytest.raises(LlmtuneError, match=r"'training.batch_size' is 'sixteen' \(str\); it must be an integer"):
        load_recipe({"data": {"train_file": "a.jsonl"}, "training": {"batch_size": "sixteen"}})
    with pytest.raises(LlmtuneError, match=r"'method.type' is 'lorra'.*Did you mean \"lora\""):
        load_recipe({"data": {"train_file": "a.jsonl"}}, ["method.type=lorra"])


def test_values_are_coerced_where_harmless():
    recipe = load_recipe(
        {"data": {"train_file": "a.jsonl"}},
        ["training.learning_rate=5e-5", "training.epochs=2", "eval.metrics=accuracy", "training.eval_every=50"],
    )
    assert recipe.training.learning_rate == pytest.approx(5e-5)
    assert recipe.training.epochs == 2.0 and isinstance(recipe.training.epochs, float)
    assert recipe.eval.metrics == ["accuracy"]
    assert recipe.training.eval_every == 50


def test_relative_paths_anchor_at_the_recipe_file_and_overrides_at_cwd(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.yaml"
    path.write_text("data:\n  train_file: data/train.jsonl\n  eval_file: ../e.csv\n")
    recipe = load_recipe(path)
    assert recipe.data.train_file == str(tmp_path / "sub" / "data" / "train.jsonl")
    assert recipe.data.eval_file == str(tmp_path / "e.csv")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path, ["data.train_file=other.jsonl"])
    assert recipe.data.train_file == str(tmp_path / "other.jsonl")
    assert load_recipe(path, ["model.name=org/model"]).model.name == "org/model"  # Hub ids stay ids


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.dataset=glue"], "Set exactly one data source"),
        (["training.early_stopping_patience=2"], "needs an eval set"),
        (["data.validation_fraction=0.1", "data.eval_file=e.jsonl"], "already given"),
        (["output.save=adapter"], "there is no adapter"),
        (["training.eval_every=no"], "save_every' is 'eval'"),
        (["training.metric_for_best=bleu"], "not among 'eval.metrics'"),
        (["eval.metrics=[accuracy, acuracy]"], 'Did you mean "accuracy"'),
        (["training.precision=fp8"], "valid values are"),
    ],
)
def test_cross_field_rules_say_how_to_fix(overrides, message):
    with pytest.raises(LlmtuneError, match=message):
        load_recipe({"data": {"train_file": "a.jsonl"}}, overrides)


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    with pytest.raises(LlmtuneError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(LlmtuneError, match="not valid YAML"):
        load_recipe(write(tmp_path, "data: [unclosed\n"))


def test_a_hub_recipe_switched_to_local_files_drops_its_split_names():
    """The README's offline SST-2 command: data.dataset=null plus files; the recipe's eval_split goes with the Hub."""
    recipe = load_recipe("recipes/sst2_minilm_full.yaml", ["data.dataset=null", "data.train_file=train.tsv",
                                                           "data.eval_file=dev.tsv"])
    assert recipe.data.eval_split is None and recipe.data.eval_file.endswith("dev.tsv")
    with pytest.raises(LlmtuneError, match=r"'data.eval_split' is 'validation'.*data\.eval_file=PATH.*eval_split=null"):
        load_recipe("recipes/sst2_minilm_full.yaml", ["data.dataset=null", "data.train_file=train.tsv"])


@pytest.mark.parametrize(("override", "message"), [
    ("training.warmup=.nan", "must be a finite number"),
    ("training.epochs=.inf", "must be a finite number"),
    ("method.dropout=1.5", "must be in [0, 1)"),
    ("training.weight_decay=-0.1", "must be 0 or more"),
])
def test_numbers_out_of_range(override, message):
    with pytest.raises(LlmtuneError, match=re.escape(message)):
        load_recipe("recipes/quickstart.yaml", [override])
