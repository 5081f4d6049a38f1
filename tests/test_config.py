"""Recipe loading: types, unknown keys, overrides, path anchoring, field bounds and choices, cross-field rules, renamed
keys, training.trainer_args and the --explain reference."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from llmtune.config import renames, rules
from llmtune.config.explain import explain
from llmtune.config.fields import describe_bounds
from llmtune.config.loader import load_recipe, resolve_defaults
from llmtune.config.schema import DataConfig, Recipe
from llmtune.config.task_rules import TASK_RULES
from llmtune.config.trainer_args import MAPPED, OVERRIDABLE, training_arguments_fields
from llmtune.config.vocab import PRECISIONS, TASKS, TRACKERS
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


# --- bounds and choices declared on the fields ---------------------------------------------------------------------

def _leaf_fields():
    """(dotted key, field, type) of every recipe key."""
    hints = typing.get_type_hints(Recipe)
    for section in dataclasses.fields(Recipe):
        if not dataclasses.is_dataclass(hints[section.name]):
            yield section.name, section, hints[section.name]
            continue
        inner = typing.get_type_hints(hints[section.name])
        for fld in dataclasses.fields(hints[section.name]):
            yield f"{section.name}.{fld.name}", fld, inner[fld.name]


def _just_outside(fld, tp):
    """A value just outside a field's bounds, as the loader converts it (floats stay floats)."""
    bounds = fld.metadata["bounds"]
    floats = float in typing.get_args(tp) or tp is float
    step = 0.5 if floats else 1
    if "ge" in bounds:
        value = bounds["ge"] - step
    elif "gt" in bounds:
        value = bounds["gt"]
    elif "le" in bounds:
        value = bounds["le"] + step
    else:
        value = bounds["lt"]
    return float(value) if floats else int(value)


BOUNDED = [(key, fld, tp) for key, fld, tp in _leaf_fields() if fld.metadata.get("bounds")]


@pytest.mark.parametrize(("key", "fld", "tp"), BOUNDED, ids=[key for key, _, _ in BOUNDED])
def test_every_declared_bound_is_enforced_for_yaml_and_overrides(key, fld, tp):
    bad = _just_outside(fld, tp)
    listed = typing.get_origin(tp) is list or list in map(typing.get_origin, typing.get_args(tp))
    value = [bad] if listed else bad
    expected = f"'{key}' {'names' if listed else 'is'} {bad!r}; it must be {describe_bounds(fld.metadata['bounds'])}"
    section, name = key.split(".")
    base = {"data": {"train_file": "a.jsonl"}}
    with pytest.raises(LlmtuneError, match=re.escape(expected)):
        load_recipe({**base, section: {**base.get(section, {}), name: value}})
    with pytest.raises(LlmtuneError, match=re.escape(expected)):
        load_recipe(base, [f"{key}={value}"])


def test_bounds_and_choices_are_declared_where_the_old_range_checks_were():
    declared = {key: fld.metadata["bounds"] for key, fld, _ in BOUNDED}
    assert declared["data.validation_fraction"] == {"ge": 0, "lt": 1}
    assert declared["training.learning_rate"] == {"gt": 0}
    assert declared["pref.label_smoothing"] == {"ge": 0, "lt": 0.5}
    assert declared["image.rotation"] == {"ge": 0, "le": 180}
    assert len(declared) >= 20
    choices = {key: fld.metadata["choices"] for key, fld, _ in _leaf_fields() if fld.metadata.get("choices")}
    assert choices["task"] is TASKS and choices["training.precision"] is PRECISIONS  # one spelling, in vocab.py
    assert choices["training.report_to"] == tuple(TRACKERS)


def test_a_number_field_that_also_takes_words_offers_them():
    with pytest.raises(LlmtuneError, match=r"'training.eval_every' is 0; it must be at least 1, or 'epoch', or 'no'\."):
        load_recipe({"data": {"train_file": "a.jsonl"}}, ["training.eval_every=0"])
    with pytest.raises(LlmtuneError, match=r"'data.max_train_samples' is 0; it must be at least 1, or empty\."):
        load_recipe({"data": {"train_file": "a.jsonl"}}, ["data.max_train_samples=0"])


def test_a_choice_outside_the_vocabulary_is_refused_at_once_with_a_suggestion():
    with pytest.raises(LlmtuneError, match=r"'task' is 'sfft'; valid values are classification, .*Did you mean \"sft\""):
        load_recipe({"task": "sfft", "data": {"train_file": "a.jsonl"}})
    with pytest.raises(LlmtuneError, match=r"'training.report_to' names 'tensorbord'.*Did you mean \"tensorboard\""):
        load_recipe({"data": {"train_file": "a.jsonl"}}, ["training.report_to=[tensorbord]"])
    with pytest.raises(LlmtuneError, match=r"'training.precision' is False; valid values are auto, fp32, bf16, fp16"):
        load_recipe({"data": {"train_file": "a.jsonl"}}, ["training.precision=off"])


def test_a_value_out_of_range_in_the_file_may_be_fixed_by_an_override():
    recipe = load_recipe({"data": {"train_file": "a.jsonl"}, "training": {"learning_rate": -1}},
                         ["training.learning_rate=1e-4"])
    assert recipe.training.learning_rate == pytest.approx(1e-4)


# --- cross-field rules: named, all reported at once, never changing the recipe -------------------------------------

def test_every_problem_is_reported_at_once_numbered():
    with pytest.raises(LlmtuneError) as caught:
        load_recipe({"data": {"train_file": "a.jsonl"}}, [
            "training.learning_rate=-1", "data.validation_fraction=1.5", "training.eval_every=no",
            "output.save=adapter", "training.trainer_args={adam_beta3: 0.9}",
        ])
    message = str(caught.value)
    assert message.startswith("The recipe has 5 problems:\n1. ")
    for fragment in ("'data.validation_fraction' is 1.5; it must be in [0, 1)",
                     "'training.learning_rate' is -1.0; it must be a positive number",
                     "'training.save_every' is 'eval' but 'training.eval_every' is 'no'",
                     "there is no adapter", 'Did you mean "adam_beta2"'):
        assert fragment in message, fragment
    assert [line[:3] for line in message.splitlines()[1:]] == ["1. ", "2. ", "3. ", "4. ", "5. "]


def test_rules_are_small_named_functions_that_do_not_change_the_recipe():
    recipe = Recipe(data=DataConfig(train_file="a.jsonl", eval_split="validation", eval_file="e.jsonl",
                                    test_split="test"))
    before = copy.deepcopy(recipe)
    found = rules.problems(recipe)
    assert recipe == before
    assert any("'data.test_split' is 'test'" in problem for problem in found)
    for each in (*rules.RULES, *TASK_RULES):
        assert each.__name__ != "<lambda>" and each(Recipe(data=DataConfig(train_file="a.jsonl"))) == [], each
    resolve_defaults(recipe)  # the loader's own step settles the split that has its file
    assert recipe.data.eval_split is None and recipe.data.test_split == "test"


def test_early_stopping_accepts_the_holdout_eval_set():
    recipe = load_recipe({"data": {"train_file": "a.jsonl", "holdout_every": 5}},
                         ["training.early_stopping_patience=2"])
    assert recipe.training.early_stopping_patience == 2


def test_explain_prints_every_key_with_default_valid_values_and_help():
    text = explain()
    assert "  training.learning_rate = 5e-05  (a number > 0)\n      Peak learning rate." in text
    assert "  data.validation_fraction = 0.0  (a number in [0, 1))" in text
    assert "  training.eval_every = 'epoch'  (an integer >= 1 or one of epoch, no)" in text
    assert "  task = 'classification'  (one of classification, image_classification," in text
    assert "  data.max_train_samples = None  (an integer >= 1 or empty)" in text
    assert "\n[training]\n" in text
    for key, _, _ in _leaf_fields():
        assert f"  {key} = " in text, key


# --- renamed keys --------------------------------------------------------------------------------------------------

@pytest.fixture()
def renamed(monkeypatch):
    """No key has been renamed yet: pretend training.lr and a whole section 'optim' were old names."""
    monkeypatch.setitem(renames.RENAMED, "training.lr", "training.learning_rate")
    monkeypatch.setitem(renames.RENAMED, "optim", "training")


def test_an_old_key_reads_as_the_new_one_with_a_warning(renamed, caplog):
    with caplog.at_level(logging.WARNING, logger="llmtune.config.renames"):
        recipe = load_recipe({"data": {"train_file": "a.jsonl"}, "training": {"lr": 1e-3}})
    assert recipe.training.learning_rate == pytest.approx(1e-3)
    assert "'training.lr' is now called 'training.learning_rate'" in caplog.text
    assert load_recipe({"data": {"train_file": "a.jsonl"}}, ["training.lr=2e-3"]).training.learning_rate == 2e-3
    moved = load_recipe({"data": {"train_file": "a.jsonl"}, "optim": {"weight_decay": 0.1}, "training": {"seed": 1}},
                        ["optim.max_grad_norm=0.5"])
    assert (moved.training.weight_decay, moved.training.seed, moved.training.max_grad_norm) == (0.1, 1, 0.5)
    with pytest.raises(LlmtuneError, match=r"both 'training.lr' .* and 'training.learning_rate'.*Keep only"):
        load_recipe({"data": {"train_file": "a.jsonl"}, "training": {"lr": 1e-3, "learning_rate": 1e-4}})


def test_resume_of_a_run_recorded_under_an_old_key_sees_no_change(renamed):
    from llmtune.run.run_dir import changed_settings

    recipe = load_recipe({"data": {"train_file": "a.jsonl"}, "training": {"learning_rate": 1e-3}})
    recorded = json.loads(json.dumps(dataclasses.asdict(recipe)))  # run.json, written before the rename
    recorded["training"]["lr"] = recorded["training"].pop("learning_rate")
    assert changed_settings(renames.rename_keys(recorded, warn=False), dataclasses.asdict(recipe)) == {}
    assert load_recipe(recorded) == recipe


# --- training.trainer_args -----------------------------------------------------------------------------------------

def test_trainer_args_reach_the_training_arguments(tmp_path):
    from llmtune.run.training import training_arguments

    recipe = load_recipe({"data": {"train_file": "a.jsonl"}},
                         ["training.trainer_args={adam_beta2: 0.95, lr_scheduler_kwargs: {power: 2.0}}"])
    args = training_arguments(recipe, str(tmp_path), "accuracy", eval_set=True)
    assert args.adam_beta2 == 0.95 and args.lr_scheduler_kwargs == {"power": 2.0}
    assert args.learning_rate == recipe.training.learning_rate
    bad = load_recipe({"data": {"train_file": "a.jsonl"}}, ["training.trainer_args={logging_strategy: sometimes}"])
    with pytest.raises(LlmtuneError, match=r"transformers refused .*'training.trainer_args'.*sometimes"):
        training_arguments(bad, str(tmp_path), "accuracy", eval_set=True)


@pytest.mark.parametrize(("args", "message"), [
    ("{adam_beta22: 0.95}", r"sets 'adam_beta22', which is not an argument of transformers' TrainingArguments "
                            r"\(transformers [\d.]+\)\. Did you mean \"adam_beta2\"\?"),
    ("{learning_rate: 1e-4}", r"sets 'learning_rate', which llmtune already sets from training\.learning_rate"),
    ("{per_device_train_batch_size: 4}", r"already sets from training\.batch_size"),
    ("{output_dir: x}", r"already sets from output\.dir"),
])
def test_trainer_args_unknown_or_mapped_names_are_refused(args, message):
    with pytest.raises(LlmtuneError, match=message):
        load_recipe({"data": {"train_file": "a.jsonl"}}, [f"training.trainer_args={args}"])


def test_trainer_args_names_come_from_transformers_source_and_cover_what_llmtune_sets(tmp_path):
    from transformers import TrainingArguments

    from llmtune.run.training import recipe_arguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    assert training_arguments_fields() == fields
    recipe = load_recipe({"data": {"train_file": "a.jsonl"}})
    set_by_llmtune = set(recipe_arguments(recipe, str(tmp_path), "accuracy", eval_set=True))
    assert set_by_llmtune <= set(MAPPED) | set(OVERRIDABLE)
    older = {"warmup_ratio", "overwrite_output_dir", "group_by_length"}  # names of earlier transformers releases
    assert set(MAPPED) - older <= fields


def test_loading_a_recipe_imports_no_training_library():
    code = ("import sys; from llmtune.config.loader import load_recipe; from llmtune.config.explain import explain; "
            "load_recipe({'data': {'train_file': 'a.jsonl'}}, ['training.trainer_args={adam_beta2: 0.95}']); explain(); "
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_trainer_args_read_exponent_numbers_as_numbers_at_any_depth():
    """YAML 1.1 reads 1e-6 as a string; passed through untyped it would reach the scheduler as one."""
    recipe = load_recipe("recipes/quickstart.yaml", [
        "training.trainer_args={lr_scheduler_kwargs: {min_lr: 1e-6}, adam_epsilon: 1E-8, run_name: 5e5-run}"])
    assert recipe.training.trainer_args == {"lr_scheduler_kwargs": {"min_lr": 1e-6}, "adam_epsilon": 1e-8,
                                            "run_name": "5e5-run"}


def test_a_path_starting_with_tilde_and_no_such_user_stays_as_written(tmp_path):
    """`~0` (no user named 0): a folder of that name, as a shell reads it - not pathlib's RuntimeError."""
    from llmtune.config.loader import expand_home

    assert expand_home("~/x") == Path.home() / "x"
    assert expand_home("~no-such-user-here/x") == Path("~no-such-user-here/x")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: '~no-such-user-here/model'}\ndata: {train_file: train.jsonl}\n")
    assert load_recipe(recipe).model.name.endswith("~no-such-user-here/model")
