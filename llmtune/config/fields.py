"""The one helper every schema section uses to declare a field with its help text."""

from __future__ import annotations

from dataclasses import field


def _field(default, help: str, **kwargs):  # noqa: A002 - "help" reads best in the schema below
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})
