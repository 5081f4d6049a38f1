"""Property-based tests: whatever a user writes - a recipe file, overrides, columns of a data file - llmtune answers
with a valid recipe / format or with its own one-paragraph error, never with another exception."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing

import yaml
from conftest import REPO
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llmtune.config.loader import load_recipe
from llmtune.config.schema import Recipe
from llmtune.config.vocab import OPTIMIZERS
from llmtune.data.formats import FORMAT_COLUMNS, detect_format
from llmtune.errors import LlmtuneError

SECTIONS = {f.name: [g.name for g in dataclasses.fields(f.default_factory())]
            for f in dataclasses.fields(Recipe) if f.default_factory is not dataclasses.MISSING}
BASE = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
KEYS = sorted({*SECTIONS, *(k for keys in SECTIONS.values() for k in keys)})

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=30), st.sampled_from(["auto", "lora", "4bit", "epoch", "no", "sft", "1e-4",
                                                           "classification", "pretrain", "[a, b]", "null"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                      max_leaves=10)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=15))
sections = st.dictionaries(keys, values, max_size=6)
# Random recipes, and random changes to a valid one (so that many are accepted and the checks after parsing run).
recipes = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(list(SECTIONS)), st.text(max_size=10)), st.one_of(sections, values),
                    max_size=6),
    st.builds(lambda section, changes: {**BASE, section: {**(BASE.get(section) or {}), **changes}},
              st.sampled_from(list(SECTIONS)), st.dictionaries(st.sampled_from(KEYS), values, max_size=3)),
)
override_keys = st.one_of(
    st.builds(lambda s, k: f"{s}.{k}", st.sampled_from(list(SECTIONS)), st.sampled_from(KEYS)),
    st.sampled_from(KEYS), st.text(max_size=20))
override_values = st.one_of(st.text(max_size=20), st.sampled_from(["1", "-1", "0.5", "1e-4", "null", "true", "[x]",
                                                                   "{a: 1}", "epoch", "lora", "']['"]))
overrides = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", override_keys, override_values),
                               st.text(max_size=25)), max_size=4)
CHECKS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def accepted_or_explained(call) -> None:
    try:
        result = call()
    except LlmtuneError as exc:
        assert str(exc).strip(), "an empty error message"
    else:
        assert isinstance(result, (Recipe, str))
        if isinstance(result, Recipe):  # a recipe that got through holds no nonsense numbers
            for section in SECTIONS:
                for key, value in dataclasses.asdict(getattr(result, section)).items():
                    assert not isinstance(value, float) or math.isfinite(value), (section, key, value)


@CHECKS
@given(recipes)
def test_any_recipe_mapping_gives_a_recipe_or_an_llmtune_error(raw):
    accepted_or_explained(lambda: load_recipe(raw))


def test_the_generator_reaches_valid_recipes():
    """The mapping strategy must produce accepted recipes too, or the property above only tests rejections."""
    accepted = 0

    @settings(max_examples=100, deadline=None, database=None)
    @given(recipes)
    def count(raw):
        nonlocal accepted
        try:
            load_recipe(raw)
            accepted += 1
        except LlmtuneError:
            pass

    count()
    assert accepted >= 3, accepted


@CHECKS
@given(st.text(max_size=300))
def test_any_recipe_file_text_gives_a_recipe_or_an_llmtune_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(text)
    accepted_or_explained(lambda: load_recipe(path))


@CHECKS
@given(recipes.map(lambda raw: yaml.safe_dump(raw, allow_unicode=True)))
def test_any_yaml_document_gives_a_recipe_or_an_llmtune_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(text)
    accepted_or_explained(lambda: load_recipe(path))


@CHECKS
@given(overrides)
def test_any_overrides_give_a_recipe_or_an_llmtune_error(items):
    accepted_or_explained(lambda: load_recipe(REPO / "recipes" / "quickstart.yaml", items))


column_names = st.lists(st.one_of(st.sampled_from(sorted({c for cols in FORMAT_COLUMNS.values() for c in cols})),
                                  st.text(max_size=12)), max_size=6, unique=True)
mappings = st.dictionaries(st.one_of(st.sampled_from(["text", "prompt", "messages", "instruction", "output"]),
                                     st.text(max_size=8)), st.text(max_size=12), max_size=3)


@CHECKS
@given(column_names, mappings)
def test_format_detection_names_a_format_or_explains(columns, mapping):
    accepted_or_explained(lambda: detect_format(columns, mapping, "the training data"))


# --- resume: the recipe recorded in run.json loads back into the same recipe ----------------------------------------

def _number_range(bounds: dict, floats: bool) -> dict:
    low = bounds.get("ge", bounds.get("gt", -1000))
    high = bounds.get("le", bounds.get("lt", 10**6))
    if floats:
        return {"min_value": float(low), "max_value": float(high), "exclude_min": "gt" in bounds,
                "exclude_max": "lt" in bounds, "allow_nan": False, "allow_infinity": False}
    return {"min_value": int(low) + ("gt" in bounds), "max_value": int(high) - ("lt" in bounds)}


def valid_values_of(tp, metadata) -> st.SearchStrategy:
    """Values a field accepts on its own (its type, bounds and choices); cross-field rules may still refuse them."""
    bounds, choices = metadata.get("bounds") or {}, metadata.get("choices")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if choices:
        return st.lists(st.sampled_from(choices), max_size=2) if origin is list else st.sampled_from(choices)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(st.none() if a is type(None) else valid_values_of(a, metadata) for a in args))
    if origin is list:
        return st.lists(valid_values_of(args[0], metadata), max_size=3)
    if origin is dict:
        return st.dictionaries(st.text(max_size=8), valid_values_of(args[1], metadata), max_size=2)
    if tp is bool:
        return st.booleans()
    if tp in (int, float):
        return (st.floats if tp is float else st.integers)(**_number_range(bounds, tp is float))
    return st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)


# Keys whose valid values depend on the machine or on other keys in ways a generator cannot know: held at values
# that are valid everywhere (the data source stays data.train_file).
HELD = {
    "data.dataset": st.none(), "data.train_file": st.just("train.jsonl"), "data.mixture": st.sampled_from(
        [[], [{"train_file": "extra.jsonl", "weight": 0.5}]]),
    "training.optimizer": st.sampled_from(sorted(OPTIMIZERS)), "training.report_to": st.just([]),
    "output.push_to_hub": st.sampled_from([None, "user/model"]),
    "training.trainer_args": st.sampled_from([{}, {"adam_beta2": 0.95}, {"lr_scheduler_kwargs": {"power": 2.0}},
                                              {"neftune_noise_alpha": 5, "ddp_timeout": 7200}]),
}


def _leaves() -> dict[str, st.SearchStrategy]:
    strategies = {}
    hints = typing.get_type_hints(Recipe)
    for section in dataclasses.fields(Recipe):
        if not dataclasses.is_dataclass(hints[section.name]):
            strategies[section.name] = valid_values_of(hints[section.name], section.metadata)
            continue
        inner = typing.get_type_hints(hints[section.name])
        for fld in dataclasses.fields(hints[section.name]):
            key = f"{section.name}.{fld.name}"
            strategies[key] = HELD[key] if key in HELD else valid_values_of(inner[fld.name], fld.metadata)
    return strategies


LEAVES = _leaves()


@st.composite
def valid_recipes(draw) -> dict:
    raw: dict = {"data": {"train_file": "train.jsonl"}}
    for key in draw(st.lists(st.sampled_from(sorted(LEAVES)), max_size=6, unique=True)):
        section, _, name = key.partition(".")
        value = draw(LEAVES[key])
        if name:
            raw.setdefault(section, {})[name] = value
        else:
            raw[section] = value
    return raw


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(valid_recipes())
def test_the_recipe_recorded_in_run_json_loads_back_unchanged(raw):
    """--resume compares the command's recipe with the one run.json recorded (dataclasses.asdict, as JSON): that
    record must load into an equal Recipe, or a resumed run would see settings change that nobody changed."""
    try:
        recipe = load_recipe(raw)
    except LlmtuneError:
        assume(False)
    recorded = json.loads(json.dumps(dataclasses.asdict(recipe)))
    assert load_recipe(recorded) == recipe
    assert load_recipe(recorded, [f"data.train_file={recipe.data.train_file}"]) == recipe  # overrides too
