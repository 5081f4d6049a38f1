"""Prompts for online RL (task grpo): rows with a prompt - a string, or a conversation ending with a user turn -
and any other columns, which reach the reward functions as they are (a row's `constraints`, its `answer`, ...).

A prompt column is `prompt` (or what data.columns maps to it), else `messages` (a chat ending in assistant turns
is cut back to its last user turn), else alpaca's `instruction` (with its `input`). Prompts longer than the room
left for a completion lose their oldest turns, and one that still does not fit is dropped and counted, as for
preference pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasets import Dataset

from llmtune.config.schema import DataConfig
from llmtune.data.loading import describe_source, load_splits
from llmtune.data.preference import Dropped, drop_unfit, keep_usable, prompt_messages
from llmtune.errors import LlmtuneError

PROMPT_COLUMNS = ("prompt", "messages", "instruction")


def prompt_column(columns: list[str], mapping: dict[str, str], where: str) -> str:
    """The column the prompts are read from."""
    if mapping.get("prompt"):
        if mapping["prompt"] not in columns:
            raise LlmtuneError(f"'data.columns' maps prompt to {mapping['prompt']!r}, but {where} has no such column "
                               f"(columns: {', '.join(columns)}).")
        return mapping["prompt"]
    found = next((c for c in PROMPT_COLUMNS if c in columns), None)
    if found is None:
        raise LlmtuneError(
            f"{where} has no prompt column (columns: {', '.join(columns)}). Task grpo reads 'prompt' (a string or a "
            "list of {role, content} messages ending with a user turn), 'messages' or 'instruction'; map another "
            "name with data.columns={prompt: NAME}."
        )
    return found


def to_prompts(rows: Dataset, column: str, system_prompt: str | None) -> Dataset:
    """Rows with `prompt` as a message list (system prompt first when the recipe sets one); other columns kept."""
    def convert(row: dict[str, Any]) -> dict[str, Any]:
        value = row[column]
        if column == "instruction" and row.get("input"):
            value = f"{value}\n\n{row['input']}"
        if isinstance(value, list):  # a whole chat (SFT data): its turns up to the last user turn are the prompt
            while value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
                value = value[:-1]
        try:
            messages = prompt_messages(value)
        except Dropped as why:
            return {"prompt": [{"role": "user", "content": ""}], "dropped": str(why)}
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        return {"prompt": messages, "dropped": ""}

    drop = [c for c in (column, "messages") if c in rows.column_names and c != "prompt"]
    return rows.map(convert, remove_columns=drop, desc="Reading prompts")


def load_prompt_splits(data: DataConfig, seed: int, prompt_tokens: Callable[[list], int], room: int,
                       prepare: Callable[[Dataset, str], Dataset] | None = None
                       ) -> tuple[dict[str, Dataset], dict[str, dict[str, int]]]:
    """Every split as prompts that fit in `room` tokens (chat template included), and the rows dropped per split
    and reason. `prepare(rows, split)` may change the prompts first (e.g. add instructions to them)."""
    splits = dict(load_splits(data, seed))
    splits.pop("test", None)
    prepared, dropped = {}, {}
    for split, rows in splits.items():
        where = f"the {split} data ({describe_source(data, split)})"
        column = prompt_column(rows.column_names, data.columns, where)
        converted = to_prompts(rows, column, data.system_prompt)
        converted, reasons = keep_usable(converted, where)
        if prepare is not None:
            converted = prepare(converted, split)
        converted, too_long = drop_unfit(converted, prompt_tokens, room + 1, room, where)
        prepared[split] = converted
        dropped[split] = dict(reasons + too_long)
    return prepared, dropped
