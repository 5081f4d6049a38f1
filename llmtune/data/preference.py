"""Preference data in every common layout, turned into one internal form of message lists:

    pairs (dpo, orpo, simpo, reward):  prompt [messages ending with a user turn], chosen [assistant], rejected [assistant]
    unpaired (kto):                    prompt [...], completion [assistant], label (true = desirable)

Layouts, told apart by their columns (`data.columns` maps other names onto these):
  prompt + chosen + rejected      strings, or message lists (a reply list may repeat the prompt in front)
  messages + chosen + rejected    the shared conversation, then the two replies
  chosen + rejected               two whole transcripts that differ only in the last assistant reply, as plain
                                  text ("\\n\\nHuman: ...\\n\\nAssistant: ...", Anthropic HH) or message lists
  prompt + completion + label     unpaired feedback (kto); paired data is unpaired for kto (one row per reply)

Rows that cannot teach anything are dropped and counted by reason, not trained on: identical replies, an empty
reply, transcripts whose shared turns differ, and (after tokenization) prompts that leave no room for a reply.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from datasets import Dataset, concatenate_datasets

from llmtune.config.schema import DataConfig
from llmtune.data.loading import describe_source, load_splits
from llmtune.errors import LlmtuneError, did_you_mean

logger = logging.getLogger(__name__)

PAIRED_LAYOUTS: dict[str, tuple[str, ...]] = {
    "prompt_pairs": ("prompt", "chosen", "rejected"),
    "messages_pairs": ("messages", "chosen", "rejected"),
    "transcript_pairs": ("chosen", "rejected"),
}
UNPAIRED_LAYOUT = ("prompt", "completion", "label")
TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}


def detect_layout(columns: list[str], mapping: dict[str, str], paired: bool, where: str) -> str:
    """The layout of preference rows from their columns: a key of PAIRED_LAYOUTS, or 'unpaired'."""
    col = lambda name: mapping.get(name, name)  # noqa: E731
    if not paired and all(col(c) in columns for c in UNPAIRED_LAYOUT):
        return "unpaired"
    for layout, needed in PAIRED_LAYOUTS.items():
        if all(col(c) in columns for c in needed):
            return layout
    pair = " and ".join(repr(col(c)) for c in ("chosen", "rejected"))
    if pair != "'chosen' and 'rejected'":
        pair += " (chosen and rejected, as data.columns names them)"
    wanted = f"columns {pair}" if paired else f"columns 'prompt', 'completion' and 'label' (or paired columns {pair})"
    # kto data that has begun the unpaired layout is told what that layout lacks; all other data, the pair's
    feedback = not paired and any(col(c) in columns for c in ("prompt", "completion")) and col("chosen") not in columns
    standard = UNPAIRED_LAYOUT if feedback else ("chosen", "rejected")
    missing = [name for name in standard if col(name) not in columns]
    problems = "; ".join([*(_missing_column(name, columns) for name in missing if col(name) == name),
                          *_unmapped([name for name in missing if col(name) != name], col, columns)])
    mappable = [(name, found) for name in missing if (found := _near_match(col(name), columns))]
    fix = (f"data.columns={{{', '.join(f'{name}: {found!r}' for name, found in mappable)}}}" if mappable else
           "data.columns={chosen: better, rejected: worse}")
    raise LlmtuneError(
        f"{where} has columns {', '.join(repr(c) for c in columns)}, but preference training needs {wanted}: "
        f"{problems}. Layouts: prompt/chosen/rejected, messages/chosen/rejected, chosen/rejected whole transcripts"
        f"{', prompt/completion/label' if not paired else ''}. Map other names with data.columns, e.g. {fix}."
    )


def _near_match(name: str, columns: list[str]) -> str | None:
    """A column that is `name` but for spaces around it or letter case (a CSV header written 'a, b' gives ' b')."""
    return next((c for c in columns if c != name and c.strip().casefold() == name.strip().casefold()), None)


def _missing_column(name: str, columns: list[str]) -> str:
    """Why the standard column `name` is not found: a near miss in spaces or case, a typo, or simply absent."""
    near = _near_match(name, columns)
    if near is None:
        hint = did_you_mean(name, columns).strip()
        return f"no column {name!r}" + (f" ({hint})" if hint else "")
    why = "differs only in case" if near.strip() == near else "has a space before or after its name"
    return f"no column {name!r} ({near!r} {why}: rename it, or map it)"


def _unmapped(names: list[str], col: Callable[[str], str], columns: list[str]) -> list[str]:
    """Why standard columns that data.columns maps to other names are not found (at most one sentence)."""
    if not names:
        return []
    maps = " and ".join(f"{name} to {col(name)!r}" for name in names)
    there = [name for name in names if name in columns]
    own = (f"; the data has {' and '.join(repr(name) for name in there)} under the standard name: remove those "
           "entries from data.columns to use them" if there else "")
    return [f"data.columns maps {maps}, but the data has no such column{own}"]


def to_pairs(rows: Dataset, layout: str, mapping: dict[str, str], system_prompt: str | None,
             where: str) -> tuple[Dataset, Counter]:
    """Paired rows -> prompt / chosen / rejected message lists; dropped rows counted by reason."""
    col = lambda name: mapping.get(name, name)  # noqa: E731

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            prompt, chosen, rejected = _split_pair(row, layout, col)
        except Dropped as dropped:
            return {"prompt": [], "chosen": [], "rejected": [], "dropped": str(dropped)}
        except LlmtuneError as exc:
            raise LlmtuneError(f"{where}, row {index}: {exc}") from None
        if system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        why = _unusable(chosen, rejected)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "dropped": why}

    converted = rows.map(convert, with_indices=True, remove_columns=rows.column_names, desc="Reading preference pairs")
    return keep_usable(converted, where)


def to_unpaired(rows: Dataset, layout: str, mapping: dict[str, str], system_prompt: str | None,
                where: str) -> tuple[Dataset, Counter]:
    """Unpaired feedback rows (or pairs, each reply becoming one row) -> prompt / completion / label."""
    if layout != "unpaired":
        pairs, dropped = to_pairs(rows, layout, mapping, system_prompt, where)
        chosen = pairs.select_columns(["prompt", "chosen"]).rename_column("chosen", "completion")
        rejected = pairs.select_columns(["prompt", "rejected"]).rename_column("rejected", "completion")
        unpaired = concatenate_datasets([chosen.add_column("label", [True] * len(chosen)),
                                         rejected.add_column("label", [False] * len(rejected))])
        return unpaired.shuffle(seed=0), dropped
    col = lambda name: mapping.get(name, name)  # noqa: E731

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        label = row[col("label")]
        if isinstance(label, str) and label.strip().lower() in ("true", "false", "1", "0"):
            label = label.strip().lower() in ("true", "1")
        if not isinstance(label, (bool, int)) or label not in (0, 1):
            raise LlmtuneError(
                f"{where}, row {index}: '{col('label')}' is {label!r}; kto labels are true (a desirable completion) "
                "or false (an undesirable one)."
            )
        try:
            prompt = prompt_messages(row[col("prompt")])
            completion = _reply_messages(row[col("completion")], prompt)
        except Dropped as dropped:
            return {"prompt": [], "completion": [], "label": False, "dropped": str(dropped)}
        except LlmtuneError as exc:
            raise LlmtuneError(f"{where}, row {index}: {exc}") from None
        if system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        empty = not completion[0]["content"].strip()
        return {"prompt": prompt, "completion": completion, "label": bool(label),
                "dropped": "empty reply" if empty else ""}

    converted = rows.map(convert, with_indices=True, remove_columns=rows.column_names, desc="Reading feedback rows")
    return keep_usable(converted, where)


def load_preference_splits(data: DataConfig, seed: int, paired: bool, prompt_tokens: Callable[[list], int],
                           max_prompt_length: int | None) -> tuple[dict[str, Dataset], str, dict[str, dict[str, int]]]:
    """Every split in the internal form, the training data's layout, and the rows dropped per split and reason.
    `prompt_tokens(messages)` counts a prompt's tokens as the model will see it."""
    splits = dict(load_splits(data, seed))
    splits.pop("test", None)
    layout = detect_layout(splits["train"].column_names, data.columns, paired, "the training data")
    convert = to_pairs if paired else to_unpaired
    prepared, dropped = {}, {}
    for split, rows in splits.items():
        where = f"the {split} data ({describe_source(data, split)})"
        split_layout = layout if split == "train" else detect_layout(rows.column_names, data.columns, paired, where)
        rows, reasons = convert(rows, split_layout, data.columns, data.system_prompt, where)
        rows, too_long = drop_unfit(rows, prompt_tokens, data.max_length, max_prompt_length, where)
        prepared[split] = rows
        dropped[split] = dict(reasons + too_long)
    return prepared, layout, dropped


def chat_prompt_tokens(tokenizer: Any) -> Callable[[list], int]:
    """Token count of a prompt rendered by the chat template, ready for the reply."""
    def count(prompt: list[dict[str, str]]) -> int:
        return len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
                   ["input_ids"])
    return count


def as_text(messages: list[dict[str, str]]) -> str:
    """A conversation as plain text, for models without a chat template (encoders scoring a whole exchange)."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def drop_unfit(rows: Dataset, prompt_tokens: Callable[[list], int], max_length: int, max_prompt_length: int | None,
               where: str) -> tuple[Dataset, Counter]:
    """Shorten prompts to `max_prompt_length` tokens by dropping their oldest turns (keeping a system turn and the
    last user turn), then drop rows whose prompt leaves no room for a reply within `max_length`."""
    limit = min(max_prompt_length or max_length, max_length - 1)

    def fit(row: dict[str, Any]) -> dict[str, Any]:
        prompt = row["prompt"]
        system = prompt[:1] if prompt[0]["role"] == "system" else []
        turns = prompt[len(system):]
        while prompt_tokens(system + turns) > limit and len(turns) > 1:
            turns = turns[2:] if len(turns) > 2 else turns[-1:]  # one user + assistant exchange at a time
        fits = prompt_tokens(system + turns) <= limit
        return {"prompt": system + turns, "dropped": "" if fits else "prompt leaves no room for a reply"}

    shortened = rows.map(fit, desc="Fitting prompts to max_length")
    return keep_usable(shortened, where)


# --- pieces -------------------------------------------------------------------------------------------------


class Dropped(Exception):
    """A row that is skipped and counted, with the reason."""


def keep_usable(converted: Dataset, where: str) -> tuple[Dataset, Counter]:
    reasons = Counter(r for r in converted["dropped"] if r)
    kept = converted.filter(lambda row: not row["dropped"], desc="Dropping unusable rows").remove_columns("dropped")
    if reasons:
        logger.warning("%s: dropped %d of %d rows (%s).", where, sum(reasons.values()), len(converted),
                       ", ".join(f"{n} {why}" for why, n in reasons.most_common()))
    if len(kept) == 0:
        raise LlmtuneError(
            f"{where}: every one of its {len(converted)} rows was dropped "
            f"({', '.join(f'{n} {why}' for why, n in reasons.most_common())}), so there is nothing to train on. "
            "Check the columns (data.columns), and raise data.max_length if prompts are too long."
        )
    return kept, reasons


def _unusable(chosen: list[dict[str, str]], rejected: list[dict[str, str]]) -> str:
    if not chosen[0]["content"].strip() or not rejected[0]["content"].strip():
        return "empty reply"
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        return "identical replies"
    return ""


def _split_pair(row: dict[str, Any], layout: str, col: Any) -> tuple[list, list, list]:
    if layout == "transcript_pairs":
        chosen_turns = _conversation(row[col("chosen")], "chosen")
        rejected_turns = _conversation(row[col("rejected")], "rejected")
        if chosen_turns[:-1] != rejected_turns[:-1]:
            raise Dropped("transcripts differ before the last reply")
        prompt = chosen_turns[:-1]
        if not prompt or prompt[-1]["role"] != "user":
            raise Dropped("transcript has no prompt before the last reply")
        return prompt, chosen_turns[-1:], rejected_turns[-1:]
    prompt = prompt_messages(row[col("prompt" if layout == "prompt_pairs" else "messages")])
    return prompt, _reply_messages(row[col("chosen")], prompt), _reply_messages(row[col("rejected")], prompt)


def _conversation(value: Any, column: str) -> list[dict[str, str]]:
    """A whole transcript (HH text or a message list) as messages ending with the assistant reply."""
    if isinstance(value, str):
        parts = TRANSCRIPT_TURN.split("\n\n" + value.lstrip("\n") if not value.startswith("\n\n") else value)
        if len(parts) < 3 or parts[0].strip():
            raise Dropped("not a Human/Assistant transcript")
        turns: list[dict[str, str]] = []
        for speaker, text in zip(parts[1::2], parts[2::2], strict=True):
            role = TRANSCRIPT_ROLES[speaker]
            if turns and turns[-1]["role"] == role:  # two turns of one speaker in a row read as one
                turns[-1]["content"] += "\n\n" + text.strip()
            else:
                turns.append({"role": role, "content": text.strip()})
    else:
        turns = _message_list(value, column)
    if turns[-1]["role"] != "assistant":
        raise Dropped("transcript does not end with an assistant reply")
    return turns


def prompt_messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise Dropped("empty prompt")
        return [{"role": "user", "content": value}]
    messages = _message_list(value, "prompt")
    if messages[-1]["role"] != "user":
        raise LlmtuneError(
            f"the prompt ends with a {messages[-1]['role']} turn; a prompt ends with the user turn the replies answer."
        )
    return messages


def _reply_messages(value: Any, prompt: list[dict[str, str]]) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = _message_list(value, "reply")
    if len(messages) > 1 and messages[: len(prompt)] == prompt:
        messages = messages[len(prompt):]  # a reply that repeats the conversation in front of it
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise LlmtuneError(
            f"a reply is {len(messages)} messages ({', '.join(m['role'] for m in messages)}); a reply is one "
            "assistant message (or the prompt's conversation followed by one)."
        )
    return messages


def _message_list(value: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) and "role" in m for m in value):
        raise LlmtuneError(
            f"the {what} is {type(value).__name__} {str(value)[:60]!r}; expected a string or a list of "
            "{role, content} messages."
        )
    return [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in value]
