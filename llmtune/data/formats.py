"""Causal-LM data layouts, all turned into one internal form: a list of {role, content} messages.

Plain text stays text (it is cut into blocks later). Every conversation is checked here: it must have an
assistant turn and roles in order (optional system, then user / assistant alternating, ending with the
assistant); errors name the file, the row and the problem. Conversations with an empty turn (real datasets
have a few, e.g. Alpaca's empty outputs) are dropped and counted, not trained on.
"""

from __future__ import annotations

import logging
from typing import Any

from datasets import Dataset

from llmtune.errors import LlmtuneError, did_you_mean

logger = logging.getLogger(__name__)

# The standard columns of each format; `data.columns` maps them to other names.
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def detect_format(columns: list[str], mapping: dict[str, str], where: str) -> str:
    """The first format whose standard columns (after mapping) are all present."""
    for fmt, needed in FORMAT_COLUMNS.items():
        if all(mapping.get(c, c) in columns for c in needed):
            return fmt
    raise LlmtuneError(
        f"Cannot tell the data format of {where} from its columns ({', '.join(columns)}). Set data.format to one of "
        f"{', '.join(FORMAT_COLUMNS)} and, if your columns have other names, map them with data.columns, e.g. "
        "data.columns={instruction: question, output: answer}."
    )


def to_conversations(
    rows: Dataset, fmt: str, mapping: dict[str, str], system_prompt: str | None, where: str
) -> Dataset:
    """Rows of any chat/instruction format -> a dataset with one 'messages' column, checked row by row."""
    if fmt == "auto":
        fmt = detect_format(rows.column_names, mapping, where)
    if fmt == "text":
        raise LlmtuneError(f"{where} is plain text; conversations need instruction or chat data.")
    needed = [mapping.get(c, c) for c in FORMAT_COLUMNS[fmt]]
    for column in needed:
        if column not in rows.column_names:
            raise LlmtuneError(
                f"data.format is {fmt!r}, which needs column '{column}', but {where} has no such column."
                f"{did_you_mean(column, rows.column_names)} Its columns are: {', '.join(rows.column_names)}. "
                "Map yours with data.columns (standard name -> your column)."
            )

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        messages = _messages(row, fmt, mapping)
        if any(not isinstance(m["content"], str) or not m["content"].strip() for m in messages):
            return {"messages": []}  # an empty turn (Alpaca has empty outputs): dropped and counted below
        if system_prompt and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        check_conversation(messages, f"{where}, row {index}")
        return {"messages": messages}

    converted = rows.map(convert, with_indices=True, remove_columns=rows.column_names, desc=f"Reading {fmt} data")
    kept = converted.filter(lambda row: len(row["messages"]) > 0, desc="Dropping empty conversations")
    if len(kept) < len(converted):
        first = next(i for i, row in enumerate(converted) if not row["messages"])
        logger.warning("%s: dropped %d of %d conversations with an empty turn (the first is row %d).",
                       where, len(converted) - len(kept), len(converted), first)
    if len(kept) == 0:
        raise LlmtuneError(f"{where}: every conversation has an empty turn, so there is nothing to train on.")
    return kept


def text_column(rows: Dataset, mapping: dict[str, str], where: str) -> str:
    column = mapping.get("text", "text")
    if column not in rows.column_names:
        raise LlmtuneError(
            f"Plain-text training needs a '{column}' column, but {where} has: {', '.join(rows.column_names)}. "
            "Map yours with data.columns={text: your_column}."
        )
    return column


def _messages(row: dict[str, Any], fmt: str, mapping: dict[str, str]) -> list[dict[str, str]]:
    col = lambda name: mapping.get(name, name)  # noqa: E731 - a one-line lookup reads best inline
    if fmt == "messages":
        return [{"role": m.get("role"), "content": m.get("content")} for m in row[col("messages")] or []]
    if fmt == "sharegpt":
        return [
            {"role": SHAREGPT_ROLES.get(str(m.get("from")).lower(), str(m.get("from"))), "content": m.get("value")}
            for m in row[col("conversations")] or []
        ]
    if fmt == "alpaca":
        extra = row.get(col("input")) or ""
        prompt = f"{row[col('instruction')]}\n\n{extra}" if extra.strip() else row[col("instruction")]
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row[col("output")]}]
    return [
        {"role": "user", "content": row[col("prompt")]},
        {"role": "assistant", "content": row[col("completion")]},
    ]


def check_conversation(messages: list[dict[str, Any]], where: str) -> None:
    """Raise LlmtuneError unless the conversation can be trained on."""
    if not any(m["role"] == "assistant" for m in messages):
        raise LlmtuneError(
            f"{where}: the conversation has no assistant turn, so there is nothing to learn. "
            "Every training conversation needs at least one assistant reply."
        )
    for i, message in enumerate(messages):
        content = message["content"]
        if not isinstance(content, str) or not content.strip():
            raise LlmtuneError(
                f"{where}: turn {i} ({message['role']}) has empty content. Remove the turn or the conversation."
            )
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(body))]
    if body != expected or body[-1] != "assistant":
        raise LlmtuneError(
            f"{where}: roles are out of order ({' -> '.join(roles)}). A conversation is an optional system turn, "
            "then user and assistant turns alternating, starting with user and ending with assistant."
        )
