"""The recipe reference (`llmtune validate --explain`): every key with its default, valid values and help text,
all read from the schema's field declarations."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from llmtune.config.fields import bounds_in_symbols
from llmtune.config.schema import Recipe


def explain(cls: type = Recipe, prefix: str = "") -> str:
    """Every key of a recipe (or of one section): `key = default  (valid values)` and its help, by section."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[fld.name]):
            lines += ["", f"[{fld.name}]", explain(hints[fld.name], f"{prefix}{fld.name}.")]
            continue
        default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()
        lines.append(f"  {prefix}{fld.name} = {default!r}  ({valid_values(hints[fld.name], fld.metadata)})")
        lines.append(f"      {fld.metadata.get('help', '')}")
    return "\n".join(lines)


def valid_values(tp: Any, metadata: Any) -> str:
    """What a field accepts, in words: its type, narrowed by its bounds and choices ('an integer >= 1 or empty')."""
    bounds, choices = metadata.get("bounds") or {}, metadata.get("choices")
    if choices:
        words = "one of " + ", ".join(map(str, choices))
        return f"a list, each {words}" if typing.get_origin(tp) is list else words
    return _type_words(tp, bounds_in_symbols(bounds))


NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("text", "texts"),
         bool: ("true or false", "true or false"), dict: ("a mapping", "mappings"), Any: ("any value", "values")}


def _type_words(tp: Any, bounds: str, plural: bool = False) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        words = " or ".join(_type_words(a, bounds, plural) for a in args if a is not type(None))
        return f"{words} or empty" if type(None) in args else words
    if origin is list:
        return f"a list of {_type_words(args[0], bounds, plural=True)}" if args else "a list"
    noun = NOUNS.get(dict if origin is dict else tp, (str(tp), str(tp)))[plural]
    return f"{noun} {bounds}" if bounds and tp in (int, float) else noun
