"""Instruction constraints a completion can be checked against, IFEval-style: each kind has a checker and the
sentence that asks for it, so prompts and their checks are made from one table.

A constraint is a dict with its kind and, where the kind takes one, a number, words or a text:
{"kind": "max_words", "number": 20}, {"kind": "include_keywords", "words": ["river"]}, {"kind": "starts_with",
"text": "Sure"}. One field per type keeps a column of constraints one Arrow type, so files of them load as data.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from llmtune.errors import LlmtuneError, did_you_mean

_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
_BULLET = re.compile(r"^\s*[*-]\s", re.M)


def _words(text: str) -> list[str]:
    return re.findall(r"\b\w+\b", text)


def _sentences(text: str) -> int:
    return len([s for s in _SENTENCE_END.split(text.strip()) if s.strip()])


def _has_letters(text: str) -> bool:
    return any(ch.isalpha() for ch in text)


def _json(text: str) -> bool:
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _has_keywords(text: str, words: Sequence[str]) -> bool:
    return all(re.search(rf"\b{re.escape(w)}\b", text, re.I) for w in words)


def _has_none_of(text: str, words: Sequence[str]) -> bool:
    return not any(re.search(rf"\b{re.escape(w)}\b", text, re.I) for w in words)


# kind -> (checker(text, value) -> bool, the instruction that asks for it, the field its value is in)
KINDS: dict[str, tuple[Callable[[str, Any], bool], str, str | None]] = {
    "lowercase": (lambda t, _: _has_letters(t) and t == t.lower(),
                  "Your entire response must be in lowercase letters; no capital letters are allowed.", None),
    "uppercase": (lambda t, _: _has_letters(t) and t == t.upper(),
                  "Your entire response must be in English capital letters only.", None),
    "no_commas": (lambda t, _: "," not in t, "Do not use any commas in your response.", None),
    "max_words": (lambda t, n: len(_words(t)) <= n, "Answer in at most {value} words.", "number"),
    "min_words": (lambda t, n: len(_words(t)) >= n, "Answer in at least {value} words.", "number"),
    "max_sentences": (lambda t, n: 0 < _sentences(t) <= n, "Answer in at most {value} sentences.", "number"),
    "min_sentences": (lambda t, n: _sentences(t) >= n, "Answer in at least {value} sentences.", "number"),
    "include_keywords": (_has_keywords, "Include the keywords {words} in your response.", "words"),
    "forbid_keywords": (_has_none_of, "Do not include the words {words} in your response.", "words"),
    "starts_with": (lambda t, s: t.strip().startswith(s), "Begin your response with the exact phrase \"{value}\".",
                    "text"),
    "ends_with": (lambda t, s: t.strip().endswith(s), "End your response with the exact phrase \"{value}\".", "text"),
    "quoted": (lambda t, _: len(t.strip()) > 1 and t.strip()[0] == t.strip()[-1] == '"',
               "Wrap your entire response in double quotation marks.", None),
    "bullets": (lambda t, n: len(_BULLET.findall(t)) == n,
                "Your answer must contain exactly {value} bullet points, each a line starting with \"* \".", "number"),
    "sections": (lambda t, n: len(re.findall(r"^\s*SECTION \d+", t, re.M)) == n,
                 "Your response must have {value} sections. Mark the beginning of each section with SECTION X.", "number"),
    "json": (lambda t, _: _json(t), "Your entire output must be valid JSON.", None),
}


FIELD_TYPES = {"number": int, "words": list, "text": str}


def value_of(constraint: dict[str, Any]) -> Any:
    """The constraint's number, words or text (None for a kind that takes none)."""
    key = KINDS[constraint["kind"]][2]
    return constraint.get(key) if key else None


def check(text: str, constraint: dict[str, Any]) -> bool:
    """Whether `text` meets one constraint. An empty reply meets none (else "no commas" would pay for silence)."""
    checker, _, _ = KINDS[constraint["kind"]]
    return bool(text.strip()) and bool(checker(text, value_of(constraint)))


def instruction(constraint: dict[str, Any]) -> str:
    """The sentence that asks for `constraint`."""
    _, sentence, _ = KINDS[constraint["kind"]]
    value = value_of(constraint)
    words = ", ".join(f'"{w}"' for w in value) if isinstance(value, list) else ""
    return sentence.format(value=value, words=words)


def constraint_problem(constraint: Any, where: str) -> str | None:
    """Why `constraint` is not one llmtune can check (one sentence), or None."""
    if not isinstance(constraint, dict) or "kind" not in constraint:
        return f"{where} is {constraint!r}; a constraint is a dict like {{\"kind\": \"max_words\", \"number\": 20}}."
    kind = constraint["kind"]
    if kind not in KINDS:
        return (f"{where} has kind {kind!r}.{did_you_mean(str(kind), KINDS)} Kinds: {', '.join(KINDS)}.")
    key = KINDS[kind][2]
    value = constraint.get(key) if key else None
    if key and not (isinstance(value, FIELD_TYPES[key]) and not isinstance(value, bool)):
        return f"{where} ({kind}) has {key} {value!r}; it needs {key} (a {FIELD_TYPES[key].__name__})."
    return None


# What the prompt builder samples from: a kind and how its value is drawn.
_SAMPLERS: dict[str, Callable[[random.Random], Any]] = {
    "lowercase": lambda r: None, "uppercase": lambda r: None, "no_commas": lambda r: None,
    "max_words": lambda r: r.choice([15, 20, 30, 50]), "min_words": lambda r: r.choice([40, 60, 80]),
    "max_sentences": lambda r: r.choice([1, 2, 3]), "min_sentences": lambda r: r.choice([3, 4, 5]),
    "include_keywords": lambda r: r.sample(["simple", "clear", "example", "important", "today", "people"], 1),
    "forbid_keywords": lambda r: r.sample(["very", "really", "thing", "good", "also"], 2),
    "starts_with": lambda r: r.choice(["Sure", "Here is", "In short"]),
    "ends_with": lambda r: r.choice(["That is all.", "Hope this helps.", "Any other questions?"]),
    "quoted": lambda r: None, "bullets": lambda r: r.choice([2, 3, 4]), "sections": lambda r: r.choice([2, 3]),
    "json": lambda r: None,
}
_EXCLUSIVE = ({"lowercase", "uppercase"}, {"lowercase", "sections"}, {"max_words", "min_words"},
              {"max_sentences", "min_sentences"},
              {"json", "quoted", "bullets", "sections"}, {"starts_with", "quoted"}, {"ends_with", "quoted"},
              {"lowercase", "starts_with"}, {"lowercase", "ends_with"}, {"uppercase", "starts_with"},
              {"uppercase", "ends_with"}, {"json", "lowercase"}, {"json", "uppercase"}, {"json", "starts_with"},
              {"json", "ends_with"})


def sample_constraints(rng: random.Random, most: int, kinds: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """1..`most` constraints of distinct, compatible kinds, values drawn by `rng`."""
    pool = list(kinds or _SAMPLERS)
    chosen: list[str] = []
    for _ in range(rng.randint(1, most)):
        fits = [k for k in pool if k not in chosen and not any({k, c} <= pair for c in chosen for pair in _EXCLUSIVE)]
        if not fits:
            break
        chosen.append(rng.choice(fits))
    return [{"kind": k, **({KINDS[k][2]: v} if (v := _SAMPLERS[k](rng)) is not None else {})} for k in chosen]


def constrain(text: str, rng: random.Random, most: int, kinds: Sequence[str] | None = None
              ) -> tuple[str, list[dict[str, Any]]]:
    """`text` with 1..`most` sampled constraints asked for after it, and those constraints."""
    constraints = sample_constraints(rng, most, kinds)
    return f"{text.strip()}\n\n{' '.join(instruction(c) for c in constraints)}", constraints


def constrained_prompts(instructions: Sequence[str], seed: int, most: int = 2, kinds: Sequence[str] | None = None
                        ) -> list[dict[str, Any]]:
    """Each instruction with 1..`most` sampled constraints appended: rows {"prompt", "constraints"} for task grpo's
    built-in `constraints` reward. The same seed gives the same rows."""
    unknown = [k for k in kinds or () if k not in _SAMPLERS]
    if unknown:
        raise LlmtuneError(f"constraint kind {unknown[0]!r} is unknown.{did_you_mean(unknown[0], _SAMPLERS)} "
                           f"Kinds: {', '.join(_SAMPLERS)}.")
    rng = random.Random(seed)
    rows = []
    for text in instructions:
        prompt, constraints = constrain(text, rng, most, kinds)
        rows.append({"prompt": prompt, "constraints": constraints})
    return rows
