"""The new-run form, generated from the recipe schema: every key with its default, valid values and help (what
`llmtune validate --explain` prints), the chosen recipe's values, and each change checked by the recipe loader's
own rules, with its message placed beside the field it names."""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from llmtune.config.explain import valid_values
from llmtune.config.loader import load_recipe, parse_override
from llmtune.config.renames import rename_keys
from llmtune.config.schema import Recipe
from llmtune.errors import LlmtuneError

_NAMED_KEY = re.compile(r"'([a-z_]+(?:\.[a-z_]+)+)'")
_PROBLEMS = re.compile(r"The recipe has \d+ problems:\n1\. ")


@functools.cache  # the schema is fixed for the process: read once
def schema_fields(cls: type = Recipe, prefix: str = "") -> list[dict[str, Any]]:
    """Every recipe key as a form field: key, section, default (as YAML text), kind of input, choices, help."""
    fields: list[dict[str, Any]] = []
    hints = typing.get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        tp = hints[fld.name]
        if dataclasses.is_dataclass(tp):
            fields += schema_fields(tp, f"{prefix}{fld.name}.")
            continue
        default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()
        choices = fld.metadata.get("choices") or (typing.get_args(tp) if typing.get_origin(tp) is Literal else None)
        kind = "bool" if tp is bool else "choice" if choices and typing.get_origin(tp) is not list else "text"
        fields.append({"key": f"{prefix}{fld.name}", "section": prefix.rstrip(".") or fld.name,
                       "path": bool(fld.metadata.get("path")),
                       "default": as_text(default), "kind": kind, "choices": [str(c) for c in choices or ()],
                       "valid": valid_values(tp, fld.metadata), "help": fld.metadata.get("help", "")})
    return fields


def as_text(value: Any) -> str:
    """A value as the text an override takes (`key=TEXT`): YAML flow style, empty for None."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if _reads_back(value) else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _reads_back(text: str) -> bool:
    try:
        return yaml.safe_load(text) == text
    except yaml.YAMLError:
        return False


def recipe_values(recipe_path: Path) -> dict[str, str]:
    """The value of every key for a recipe file, as override texts: the file's own (as written: a relative path stays
    relative to the recipe's folder), else the schema's default. A recipe that does not validate yet - a task
    template without its data - still fills the form; its errors come from `check`."""
    values = {field["key"]: field["default"] for field in schema_fields()}
    try:
        raw = rename_keys(yaml.safe_load(recipe_path.read_text()) or {}, warn=False)
    except (OSError, yaml.YAMLError) as error:
        raise LlmtuneError(f"Recipe file '{recipe_path.name}' cannot be read: {error}") from None
    if not isinstance(raw, dict):
        raise LlmtuneError(f"Recipe file '{recipe_path.name}' must hold a mapping of sections (model:, data:, ...).")
    values |= {key: as_text(value) for key, value in _flatten(raw).items()}
    return values


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and not prefix:
            flat |= _flatten(value, f"{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def overrides_for(recipe_path: Path, values: dict[str, str]) -> list[str]:
    """`key=value` for each field whose text differs from the recipe's own value. A relative path typed into a path
    field is read from the recipe's folder, as the recipe's own paths are (written out in full, so the command
    line means the same)."""
    own, paths = recipe_values(recipe_path), {f["key"] for f in schema_fields() if f["path"]}
    changed = {key: text for key, text in values.items() if text.strip() != own.get(key)}
    return [f"{key}={_anchored(text, recipe_path.parent) if key in paths else text}" for key, text in changed.items()]


def _anchored(text: str, folder: Path) -> str:
    value = text.strip()
    if not value or value.startswith(("~", "/")) or "://" in value or not ("/" in value or "." in value):
        return text  # empty, absolute, a URL, or a Hub-style bare name
    candidate = folder / value
    return str(candidate.resolve()) if candidate.exists() or candidate.parent.is_dir() else text


def check(recipe_path: Path, values: dict[str, str]) -> dict[str, Any]:
    """Validate the form as `llmtune validate` reads a recipe: the recipe file with every change applied, each
    problem the loader reports placed beside the key it names (a key the user changed first), or above the form.
    Returns the errors and the overrides."""
    overrides = overrides_for(recipe_path, values)
    errors: dict[str, str] = {}
    general: list[str] = []
    try:
        load_recipe(recipe_path, overrides)
    except LlmtuneError as error:
        keys = {field["key"] for field in schema_fields()}
        for problem in problems_in(str(error)):
            named = [key for key in _NAMED_KEY.findall(problem) if key in keys]
            key = next((k for k in named if k in values), named[0] if named else None)
            if key is None:
                general.append(problem)
            else:
                errors[key] = f"{errors[key]} {problem}" if key in errors else problem
    return {"errors": errors, "general": general, "overrides": overrides}


def problems_in(message: str) -> list[str]:
    """The loader's message as its separate problems ('The recipe has 2 problems: 1. ... 2. ...')."""
    if not _PROBLEMS.match(message):
        return [message]
    return [part.strip() for part in re.split(r"\n\d+\. ", message)[1:]]


def recipe_yaml(recipe_path: Path, overrides: list[str]) -> str:
    """The recipe file with the overrides written in: what the run will train."""
    raw = yaml.safe_load(recipe_path.read_text()) or {}
    for item in overrides:
        try:
            keys, value = parse_override(item)
        except LlmtuneError:
            continue
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else {}
        node[keys[-1]] = value
    return yaml.safe_dump(raw, sort_keys=False)
