"""Recipe keys that were renamed: a recipe (or a run.json recorded before the rename) that uses an old key still
loads, with a warning naming the new key, and means exactly what the new key means - so `--resume` of a run
recorded under the old name sees no changed setting.

Add an entry when a key is renamed: "section.old" -> "section.new" (a whole section may be renamed too, "lm" ->
"causal_lm"). No key has been renamed yet.
"""

from __future__ import annotations

import logging
from typing import Any

from llmtune.errors import LlmtuneError

logger = logging.getLogger(__name__)

RENAMED: dict[str, str] = {}


def renamed_key(key: str, warn: bool = True) -> str:
    """The current name of a dotted recipe key ('lm.old.x' -> 'lm.new.x' when 'lm.old' was renamed)."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):  # the longest renamed prefix wins
        old = ".".join(parts[:cut])
        if old in RENAMED:
            new = ".".join([RENAMED[old], *parts[cut:]])
            if warn:
                logger.warning("Recipe key '%s' is now called '%s'; it was read as '%s'. Rename it in the recipe.",
                               key, new, new)
            return new
    return key


def rename_keys(raw: dict[str, Any], warn: bool = True) -> dict[str, Any]:
    """A copy of a recipe mapping (a recipe file, or the recipe recorded in run.json) with every old key moved to
    its new name. Raises LlmtuneError when the old and the new key are both set."""
    if not RENAMED or not isinstance(raw, dict):
        return raw
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}  # sections copied
    for old, new in RENAMED.items():
        *parents, name = old.split(".")
        holder = _section(raw, parents)
        if not isinstance(holder, dict) or name not in holder:
            continue
        value = holder.pop(name)
        if warn:
            logger.warning("Recipe key '%s' is now called '%s'; it was read as '%s'. Rename it in the recipe.",
                           old, new, new)
        *parents, name = new.split(".")
        target = _section(raw, parents, create=True)
        if isinstance(target.get(name), dict) and isinstance(value, dict):  # a renamed section meets the new one
            clash = next((key for key in value if key in target[name]), None)
            target[name] = {**target[name], **value} if clash is None else target[name]
        else:
            clash = name if name in target else None
            target[name] = value if clash is None else target[name]
        if clash is not None:
            raise LlmtuneError(f"The recipe sets both '{old}' (the old name of '{new}') and '{new}'; they are the "
                               f"same key since '{old}' was renamed. Keep only '{new}'.")
    return raw


def _section(raw: Any, path: list[str], create: bool = False) -> Any:
    """The mapping at `path` (None where there is none); `create`: make the missing sections on the way."""
    for depth, name in enumerate(path):
        if create and raw.get(name) is None:
            raw[name] = {}
        raw = raw.get(name) if isinstance(raw, dict) else None
        if create and not isinstance(raw, dict):
            where = ".".join(path[: depth + 1])
            raise LlmtuneError(f"'{where}' must be a mapping of keys, got {type(raw).__name__} {raw!r}.")
    return raw
