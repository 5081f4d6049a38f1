"""The built-in reward functions of task grpo, by name, and user reward functions loaded from a file.

Every reward function takes the batch's completions (text, or one-message lists for chat prompts) and the
dataset's other columns as keyword lists, one entry per completion, and returns one float per completion
(None: this function does not score that row). Parameters from the recipe (`pattern`, `max_length`, ...) are
bound before training.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from llmtune.errors import LlmtuneError, did_you_mean
from llmtune.rewards.constraints import check

RewardFunction = Callable[..., list[float | None]]


def text_of(completion: Any) -> str:
    """A completion as text: trl hands chat completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def _column(kwargs: dict[str, Any], name: str, reward: str) -> list[Any]:
    if name not in kwargs:
        present = sorted(k for k in kwargs if not k.startswith("_"))
        raise LlmtuneError(f"reward {reward!r} reads a '{name}' column, and the prompts have none (columns: "
                           f"{', '.join(present) or 'none besides prompt'}). Add it to the data or map it with "
                           "data.columns.")
    return kwargs[name]


def constraints(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """Share of the row's `constraints` (a list of {kind, value}) the completion meets, 0 to 1."""
    rows = _column(kwargs, "constraints", "constraints")
    scores: list[float | None] = []
    for completion, wanted in zip(completions, rows):
        if not wanted:
            scores.append(None)
            continue
        text = text_of(completion)
        scores.append(sum(check(text, c) for c in wanted) / len(wanted))
    return scores


def all_constraints(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1 when the completion meets every one of the row's `constraints`, else 0 (IFEval's strict prompt level)."""
    shares = constraints(completions, **kwargs)
    return [None if s is None else float(s == 1.0) for s in shares]


_NUMBER = r"(?<![\w.])-?[\d,]*\.?\d+"  # a minus sign only where it starts the number ("3-4" is 3 and 4)


def final_answer(text: str) -> str | None:
    """The answer a text ends on: after '#### ', inside \\boxed{...}, else its last number; commas and '$' dropped."""
    for pattern in (rf"####\s*\$?({_NUMBER})", rf"\\boxed\{{\s*\$?({_NUMBER})\s*\}}"):
        found = re.findall(pattern, text)
        if found:
            return _plain(found[-1])
    numbers = re.findall(_NUMBER, text)
    return _plain(numbers[-1]) if numbers else None


def _plain(number: str) -> str:
    """A number written one way: no thousands commas, no trailing zeros ('1,250.50' -> '1250.5', '42.00' -> '42')."""
    value = number.replace(",", "").rstrip(".")
    try:
        exact = Decimal(value)
    except InvalidOperation:
        return value
    return format(exact.normalize(), "f") if exact != 0 else "0"


def exact_answer(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1 when the completion's final answer (#### N, \\boxed{N}, else its last number) equals the row's `answer`
    (a number, or a GSM8K-style solution ending '#### N'), else 0."""
    answers = _column(kwargs, "answer", "exact_answer")
    scores: list[float | None] = []
    for completion, answer in zip(completions, answers):
        wanted = final_answer(str(answer)) if answer is not None else None
        scores.append(None if wanted is None else float(final_answer(text_of(completion)) == wanted))
    return scores


def regex(completions: Sequence[Any], pattern: str, full: bool = False, **_: Any) -> list[float | None]:
    """1 when the completion matches `pattern` (anywhere; `full: true` - the whole completion), else 0."""
    compiled = re.compile(pattern, re.S)
    match = compiled.fullmatch if full else compiled.search
    return [float(match(text_of(c).strip()) is not None) for c in completions]


def soft_overlong(completions: Sequence[Any], completion_ids: Sequence[Sequence[int]], max_length: int,
                  cache: int | None = None, **_: Any) -> list[float | None]:
    """0 up to `max_length - cache` tokens, then falling linearly to -1 at `max_length` (DAPO's soft overlong
    punishment): long rambling costs before the hard cut does."""
    cache = max_length // 4 if cache is None else cache
    start = max_length - cache
    return [0.0 if len(ids) <= start else -min(1.0, (len(ids) - start) / max(cache, 1)) for ids in completion_ids]


# The names and parameters the recipe may use are config.vocab.BUILTIN_REWARDS (tests/test_rewards.py: the same).
BUILTIN: dict[str, RewardFunction] = {"constraints": constraints, "all_constraints": all_constraints,
                                      "exact_answer": exact_answer, "regex": regex, "soft_overlong": soft_overlong}


def load_function(spec: str, where: str) -> RewardFunction:
    """A reward function by name: a built-in one, or 'path/to/file.py:name' (the file is run as a module)."""
    if ":" not in spec or not spec.split(":", 1)[0].endswith(".py"):
        if spec in BUILTIN:
            return BUILTIN[spec]
        raise LlmtuneError(f"{where} is {spec!r}, neither a built-in reward{did_you_mean(spec, BUILTIN)} "
                           f"(built-in: {', '.join(BUILTIN)}) nor 'path/to/file.py:function_name'.")
    file, name = spec.rsplit(":", 1)
    path = Path(file)
    if not path.is_file():
        raise LlmtuneError(f"{where} names the file '{file}', which does not exist. Give the path of a Python file "
                           "(relative paths are read from the recipe's folder) and the function: file.py:name.")
    module_spec = importlib.util.spec_from_file_location(f"llmtune_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: any error it raises is theirs to see, in one paragraph
        raise LlmtuneError(f"{where}: running '{file}' failed with {type(exc).__name__}: {exc}.") from exc
    function = getattr(module, name, None)
    if not callable(function):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise LlmtuneError(f"{where}: '{file}' has no function {name!r}.{did_you_mean(name, names)} Its functions: "
                           f"{', '.join(names) or 'none'}.")
    return function


def bind(function: RewardFunction, params: dict[str, Any]) -> RewardFunction:
    """`function` with the recipe's parameters, called with only the arguments it accepts (a user function need
    not take **kwargs)."""
    signature = inspect.signature(function)
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())

    def call(completions: Sequence[Any], **columns: Any) -> list[float | None]:
        given = {**columns, **params}
        if not takes_all:
            given = {k: v for k, v in given.items() if k in signature.parameters}
        return function(completions=completions, **given)

    return call
