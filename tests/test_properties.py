"""Property-based tests: whatever a user writes - a recipe file, overrides, columns of a data file - llmtune answers
with a valid recipe / format or with its own one-paragraph error, never with another exception."""

from __future__ import annotations

import dataclasses
import math

import yaml
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmtune.config.loader import load_recipe
from llmtune.config.schema import Recipe
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
