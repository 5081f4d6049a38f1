"""The one helper every schema section uses to declare a field: its default, help text, bounds and choices.

A field's limits live beside its help, so the loader, `rules.check` and `llmtune validate --explain` read the same
declaration: `ge` / `gt` / `le` / `lt` bound numbers (every number of a list), `choices` names the valid strings
(a vocabulary from `vocab.py`, so that each concept is spelled in one place).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Sequence
from dataclasses import field
from typing import Any, Literal, Union

from llmtune.errors import did_you_mean

BOUNDS = ("ge", "gt", "le", "lt")


def _field(default, help: str, *, path: bool = False, choices: Sequence[Any] | None = None,  # noqa: A002 - reads best
           ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None):
    """A schema field. `path`: a file or folder path, anchored at the recipe's folder when relative."""
    bounds = {name: limit for name, limit in zip(BOUNDS, (ge, gt, le, lt)) if limit is not None}
    metadata = {"help": help, "path": path, "bounds": bounds, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _ends(bounds: dict[str, float]) -> tuple[tuple[str, float] | None, tuple[float, str] | None]:
    """The lower and upper end of a range, each with its bracket: (('[', 0), (1, ')')) for ge=0, lt=1."""
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = (bounds["le"], "]") if "le" in bounds else (bounds["lt"], ")") if "lt" in bounds else None
    return low, high


def describe_bounds(bounds: dict[str, float]) -> str:
    """The valid range in words, for errors: 'in [0, 1)', 'at least 1', 'a positive number (above 0)', ..."""
    low, high = _ends(bounds)
    if low and high:
        return f"in {low[0]}{low[1]:g}, {high[0]:g}{high[1]}"
    if low == ("(", 0):
        return "a positive number (above 0)"
    if low == ("[", 0):
        return "0 or more"
    if low:
        return f"at least {low[1]:g}" if low[0] == "[" else f"above {low[1]:g}"
    if high:
        return f"at most {high[0]:g}" if high[1] == "]" else f"below {high[0]:g}"
    return "any number"


def bounds_in_symbols(bounds: dict[str, float]) -> str:
    """The valid range in symbols, for the reference: '>= 1', '> 0', 'in [0, 1)' ('' without bounds)."""
    low, high = _ends(bounds)
    if low and high:
        return f"in {low[0]}{low[1]:g}, {high[0]:g}{high[1]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
    if high:
        return f"{'<=' if high[1] == ']' else '<'} {high[0]:g}"
    return ""


def within(value: float, bounds: dict[str, float]) -> bool:
    return (value >= bounds.get("ge", value) and value <= bounds.get("le", value)
            and ("gt" not in bounds or value > bounds["gt"]) and ("lt" not in bounds or value < bounds["lt"]))


def value_problem(where: str, value: Any, metadata: Any, others: Sequence[str] = ()) -> str | None:
    """The one-paragraph problem with a field's value (out of bounds, not a valid choice), or None when it is fine.
    A list is checked item by item; None (an empty optional field) is always fine. `others`: what else the field
    may hold besides a number ('epoch', empty), which the message then offers."""
    bounds, choices = metadata.get("bounds") or {}, metadata.get("choices")
    items = value if isinstance(value, list) else [value]
    for item in items:
        shown = f"names {item!r}" if isinstance(value, list) else f"is {item!r}"
        number = isinstance(item, (int, float)) and not isinstance(item, bool)
        if bounds and number and not within(item, bounds):
            alternatives = "".join(f", or {other}" for other in others)
            return f"'{where}' {shown}; it must be {describe_bounds(bounds)}{alternatives}."
        if choices and isinstance(item, str) and item not in choices:
            hint = did_you_mean(item, [str(c) for c in choices])
            return f"'{where}' {shown}; valid values are {', '.join(map(str, choices))}.{hint}"
    return None


def field_problems(section: Any, prefix: str = "") -> list[str]:
    """Every bounds or choices problem in a recipe (or one of its sections), walking into sub-sections."""
    problems = []
    hints = _hints(type(section))
    for fld in dataclasses.fields(section):
        value = getattr(section, fld.name)
        if dataclasses.is_dataclass(value):
            problems += field_problems(value, f"{prefix}{fld.name}.")
        elif value is not None:
            problem = value_problem(f"{prefix}{fld.name}", value, fld.metadata, _alternatives(hints[fld.name]))
            problems += [problem] if problem else []
    return problems


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _alternatives(tp: Any) -> list[str]:
    """The words a number field also accepts: its Literal options ('epoch') and 'empty' when it is optional."""
    if typing.get_origin(tp) not in (Union, types.UnionType):
        return []
    args = typing.get_args(tp)
    words = [repr(option) for arg in args if typing.get_origin(arg) is Literal for option in typing.get_args(arg)]
    return words + (["empty"] if type(None) in args else [])
