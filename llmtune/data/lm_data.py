"""Causal-LM data from any source to token ids: every split's raw rows and the mixture sources in the internal form
(a 'messages' column for chats, a 'text' column for plain text), then loss-masked conversations or fixed-size text
blocks with token statistics. The tokenized-data cache (tokenized_cache.py) keys its entries on this module and the
ones it imports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from datasets import Dataset, concatenate_datasets

from llmtune.config.schema import DataConfig, Recipe
from llmtune.data.formats import detect_format, text_column, to_conversations
from llmtune.data.lm_tokenize import tokenize_conversations, tokenize_text_blocks
from llmtune.data.loading import describe_source, load_file, load_splits
from llmtune.errors import LlmtuneError


@dataclass
class LMData:
    splits: dict[str, Dataset]  # raw rows per split
    fmt: str  # the resolved data format
    chat: bool  # conversations (chat template, loss masks) rather than plain text blocks
    loss_on: str  # "assistant" or "all"
    mixture: list[Dataset]  # extra training sources, already in the internal form (messages or text)


def load_data(recipe: Recipe) -> LMData:
    """Raw rows of every split, the extra mixture sources, and the data format."""
    data = recipe.data
    splits = dict(load_splits(data, recipe.training.seed))
    splits.pop("test", None)  # causal LMs are scored by loss and perplexity, not by a predictions file
    fmt = data.format
    if fmt == "auto" and recipe.task == "pretrain":
        fmt = "text"
    elif fmt == "auto":
        fmt = detect_format(splits["train"].column_names, data.columns, "the training data")
    chat = fmt != "text"
    loss_on = recipe.lm.loss_on if recipe.lm.loss_on != "auto" else ("assistant" if chat else "all")
    return LMData(splits, fmt, chat, loss_on, mixture_sources(data, chat))


def tokenize_splits(recipe: Recipe, lm_data: LMData, tokenizer: Any) -> tuple[dict[str, Dataset], dict[str, Any]]:
    """Loss-masked conversations or fixed-size text blocks per split, with token statistics."""
    data = recipe.data
    encoded, stats = {}, {}
    for split, rows in lm_data.splits.items():
        where = f"the {split} data ({describe_source(data, split)})"
        raw_rows = len(rows)
        rows = internal_form(rows, lm_data.fmt, data, where)
        empty_turns = raw_rows - len(rows)
        if split == "train" and lm_data.mixture:
            rows = concatenate_datasets([rows, *lm_data.mixture])
        if lm_data.chat:
            encoded[split], split_stats = tokenize_conversations(
                rows, tokenizer, lm_data.loss_on, data.max_length, split, data.preprocessing_workers
            )
            split_stats.dropped_empty_turn = empty_turns
        else:
            encoded[split], split_stats = tokenize_text_blocks(
                rows, "text", tokenizer, data.max_length, split, data.preprocessing_workers
            )
        stats[split] = split_stats.as_dict()
    return encoded, stats


def internal_form(rows: Dataset, fmt: str, data: DataConfig, where: str, columns: dict | None = None) -> Dataset:
    """Rows of any format as the internal form: a 'messages' column (chats) or a 'text' column (plain text)."""
    columns = data.columns if columns is None else columns
    if fmt != "text":
        return to_conversations(rows, fmt, columns, data.system_prompt, where)
    column = text_column(rows, columns, where)
    rows = rows.select_columns([column])
    return rows if column == "text" else rows.rename_column(column, "text")


def mixture_sources(data: DataConfig, chat: bool) -> list[Dataset]:
    """The extra training sources of data.mixture in the internal form, each scaled by its weight."""
    sources = []
    for i, source in enumerate(data.mixture):
        where = f"data.mixture[{i}]"
        if source.get("train_file"):
            rows = load_file(source["train_file"], f"{where}.train_file")
        else:
            sub = DataConfig(dataset=source["dataset"], subset=source.get("subset"),
                             train_split=source.get("train_split", "train"))
            rows = load_splits(sub, 0)["train"]
        columns = source.get("columns", data.columns)
        fmt = source.get("format", "auto")
        if fmt == "auto":
            fmt = detect_format(rows.column_names, columns, where)
        if (fmt != "text") != chat:
            raise LlmtuneError(
                f"'{where}' is {fmt} data, but the main training data is "
                f"{'conversations' if chat else 'plain text'}; a mixture must be all one or all the other."
            )
        rows = internal_form(rows, fmt, data, where, columns)
        weight = float(source.get("weight", 1.0))
        whole, part = int(weight), weight - int(weight)
        picked = [rows] * whole + ([rows.select(range(round(part * len(rows))))] if part else [])
        sources.extend(p for p in picked if len(p))
    return sources


def packing_efficiency(encoded: Dataset, max_length: int) -> float:
    """Share of packed sequence slots filled with real tokens, packing as training does (best-fit decreasing)."""
    from trl.data_utils import pack_dataset

    packed = pack_dataset(encoded.select_columns(["input_ids"]), max_length, "bfd")
    lengths = [len(ids) for ids in packed["input_ids"]]
    return sum(lengths) / max(len(lengths) * max_length, 1)
