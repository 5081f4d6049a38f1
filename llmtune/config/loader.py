"""Recipe loading: YAML file + `section.key=value` overrides -> a checked `Recipe`.

Every value is type-checked against the schema; unknown keys get a "did you mean"; renamed keys (`renames.py`) are
read under their new name; relative paths written in a recipe file are taken relative to that file, paths given on
the command line relative to the current folder. Then the defaults that depend on other keys are resolved
(`resolve_defaults`), and last every field's bounds and choices and every cross-field rule are checked at once
(`rules.check`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from llmtune.config.fields import value_problem
from llmtune.config.renames import rename_keys, renamed_key
from llmtune.config.rules import check
from llmtune.config.schema import Recipe
from llmtune.errors import LlmtuneError, did_you_mean


def load_recipe(source: str | Path | dict | None = None, overrides: list[str] | None = None) -> Recipe:
    """Build a checked Recipe from a YAML file (or a dict, or nothing = defaults) plus overrides."""
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    if isinstance(source, dict):
        raw = source
    elif source is not None:
        path = Path(source)
        if not path.is_file():
            raise LlmtuneError(f"Recipe file '{path}' does not exist. Pass the path of a .yaml recipe (see recipes/).")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise LlmtuneError(f"Recipe file '{path}' is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise LlmtuneError(f"Recipe file '{path}' must hold a mapping of sections (model:, data:, ...).")
        base_dir = path.resolve().parent

    recipe = _build(Recipe, rename_keys(raw), prefix="", base_dir=base_dir)
    for item in overrides or []:
        _apply_override(recipe, item)
    resolve_defaults(recipe)
    check(recipe)
    return recipe


def resolve_defaults(recipe: Recipe) -> None:
    """Settle the values that follow from other keys, in place, before the recipe is checked.

    Split names pick splits of data.dataset; with local files they mean nothing. A recipe written for the Hub
    (eval_split: validation) switched to files on the command line (data.dataset=null data.train_file=...
    data.eval_file=...) should simply work, so a split whose file is given is dropped. A split without its file
    stays, and `rules.splits_need_a_dataset` explains it.
    """
    data = recipe.data
    if data.dataset or not data.train_file:
        return
    for key in ("eval_split", "test_split"):
        if getattr(data, key) and getattr(data, key.replace("_split", "_file")):
            setattr(data, key, None)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split 'section.key=value' into (['section', 'key'], parsed value)."""
    if "=" not in item:
        raise LlmtuneError(
            f"Override '{item}' has no '='. Write overrides as section.key=value, e.g. training.epochs=1."
        )
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def _apply_override(recipe: Recipe, item: str) -> None:
    parts, value = parse_override(item)
    parts = renamed_key(".".join(parts)).split(".")
    target: Any = recipe
    for depth, name in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        names = [f.name for f in dataclasses.fields(target)]
        if name not in names:
            raise LlmtuneError(
                f"Unknown recipe key '{where}' in override '{item}'.{did_you_mean(name, names)} "
                f"Valid keys here: {', '.join(names)}."
            )
        if depth == len(parts) - 1:
            hints = typing.get_type_hints(type(target))
            fld = next(f for f in dataclasses.fields(target) if f.name == name)
            if dataclasses.is_dataclass(hints[name]):
                raise LlmtuneError(f"'{where}' is a section; override one of its keys, e.g. {where}.<key>=value.")
            setattr(target, name, _convert(value, fld, hints[name], where, Path.cwd()))
        else:
            target = getattr(target, name)
            if not dataclasses.is_dataclass(target):
                raise LlmtuneError(f"'{where}' is a value, not a section: write {where}=value.")


def _build(cls: type, raw: Any, prefix: str, base_dir: Path) -> Any:
    where = prefix.rstrip(".") or "the recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise LlmtuneError(f"'{where}' must be a mapping of keys, got {type(raw).__name__} {raw!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise LlmtuneError(
                f"Unknown recipe key '{prefix}{key}'.{did_you_mean(str(key), fields)} "
                f"Valid keys in {where}: {', '.join(fields)}."
            )
    kwargs = {}
    for name, fld in fields.items():
        if name not in raw:
            continue
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], raw[name], f"{prefix}{name}.", base_dir)
        else:
            kwargs[name] = _convert(raw[name], fld, hints[name], f"{prefix}{name}", base_dir)
    return cls(**kwargs)


def _convert(value: Any, fld: dataclasses.Field, tp: Any, where: str, base_dir: Path) -> Any:
    """A raw value as the field's type: coerced, checked against its choices (like a type: at once, with a "did
    you mean"), and anchored at base_dir when it is a path. Bounds are checked later with the rules, so that a
    recipe's out-of-range values are all reported together."""
    choices = fld.metadata.get("choices")
    if choices and isinstance(value, bool):
        value = _yaml_bool_spelling(value, choices)
    try:
        converted = _coerce(value, tp, where)
    except LlmtuneError:
        if not choices or isinstance(value, (list, dict)):
            raise
        raise LlmtuneError(f"'{where}' is {value!r}; valid values are {', '.join(map(str, choices))}.") from None
    problem = value_problem(where, converted, {"choices": choices}) if choices and converted is not None else None
    if problem:
        raise LlmtuneError(problem)
    return _resolve_path(converted, base_dir) if fld.metadata.get("path") else converted


def _yaml_bool_spelling(value: bool, options: Any) -> Any:
    """YAML 1.1 reads a bare no/off/yes/on as a boolean: the option that spelling meant, if there is one."""
    spellings = ("yes", "on", "true") if value else ("no", "off", "false")
    return next((s for s in spellings if s in options), value)


FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt", ".gguf", ".arrow")


def expand_home(path: str | Path) -> Path:
    """`~` and `~user` expanded as a shell does; `~name` of no user on this machine stays as written (a folder of
    that name), as in a shell, instead of pathlib's RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def _resolve_path(value: Any, base_dir: Path) -> Any:
    """Anchor a relative path at base_dir; Hub ids (org/name) and absolute paths pass unchanged."""
    if isinstance(value, list):  # data.mixture, rl.rewards: each item's own paths
        return [
            {k: _resolve_item_path(k, v, base_dir) for k, v in item.items()} if isinstance(item, dict) else item
            for item in value
        ]
    if not isinstance(value, str) or not value or "\n" in value or len(value) > 255:
        return value  # not a path (e.g. an inline chat template)
    if value.startswith("~"):
        return str(expand_home(value))
    if Path(value).is_absolute():
        return value
    candidate = base_dir / value
    if candidate.exists() or value.startswith(("./", "../")) or value.lower().endswith(FILE_SUFFIXES):
        return str(candidate.resolve())
    return value


def _resolve_item_path(key: str, value: Any, base_dir: Path) -> Any:
    """A path inside a list item: a mixture source's file or dataset, a reward's run, or the file of a reward
    function given as 'file.py:name'."""
    if key in ("train_file", "dataset", "classifier", "reward_model"):
        return _resolve_path(value, base_dir)
    if key == "function" and isinstance(value, str) and ".py:" in value:  # always a file: anchored even if missing
        file, name = value.rsplit(":", 1)
        path = expand_home(file) if file.startswith("~") else Path(file)
        return f"{path if path.is_absolute() else (base_dir / path).resolve()}:{name}"
    return value


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict or tp is dict:
        return "a mapping {key: value}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check value against type tp and convert the harmless cases (1 -> 1.0, '5e-5' -> 5e-05, 'x' -> ['x'])."""
    origin = typing.get_origin(tp)
    if tp is Any:  # training.trainer_args values: checked by transformers when the arguments are built
        return _exponent_numbers(value)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, where)
    if origin is Literal:
        return _coerce_literal(value, tp, where)
    if origin is dict or tp is dict:
        return _coerce_dict(value, tp, where)
    if origin is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise _type_error(where, value, tp)
        return [_coerce(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(items)]
    scalar = _SCALARS.get(tp)
    converted = scalar(value, where) if scalar else None
    if converted is None:
        raise _type_error(where, value, tp)
    return converted


_EXPONENT_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _exponent_numbers(value: Any) -> Any:
    """YAML 1.1 reads 1e-6 (no dot) as a string; in values passed through untyped, such strings are the numbers
    their writer meant (lr_scheduler_kwargs: {min_lr: 1e-6})."""
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value):
        return float(value)
    if isinstance(value, dict):
        return {key: _exponent_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_exponent_numbers(item) for item in value]
    return value


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for option in (a for a in args if a is not type(None)):
        try:
            return _coerce(value, option, where)
        except LlmtuneError:
            continue
    raise _type_error(where, value, tp)


def _coerce_literal(value: Any, tp: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if isinstance(value, bool):
        value = _yaml_bool_spelling(value, args)
    if value in args and not isinstance(value, bool):
        return value
    hint = did_you_mean(str(value), [str(a) for a in args])
    raise LlmtuneError(f"'{where}' is {value!r}; valid values are {_describe(tp)}.{hint}")


def _coerce_dict(value: Any, tp: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise _type_error(where, value, tp)
    args = typing.get_args(tp)
    if not args:
        return dict(value)
    return {_coerce(k, args[0], where): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}


def _as_bool(value: Any, where: str) -> bool | None:
    return value if isinstance(value, bool) else None


def _as_int(value: Any, where: str) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _as_float(value: Any, where: str) -> float | None:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:  # YAML 1.1 reads 5e-5 (no dot) as a string
            number = float(value)
        except ValueError:
            return None
    if number is not None and not math.isfinite(number):
        raise LlmtuneError(f"'{where}' is {value!r}; it must be a finite number.")
    return number


def _as_str(value: Any, where: str) -> str | None:
    return value if isinstance(value, str) else None


# Scalar types -> a converter that returns the value as that type, or None when it is not one.
_SCALARS = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}


def _type_error(where: str, value: Any, tp: Any) -> LlmtuneError:
    return LlmtuneError(f"'{where}' is {value!r} ({type(value).__name__}); it must be {_describe(tp)}.")
