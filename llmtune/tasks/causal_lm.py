"""Causal LMs: instruction / chat SFT, continued pretraining, and pretraining from scratch.

The story, top to bottom: load the data -> tokenizer and model (pretrained, or trained/built from zero)
-> chat template and end-of-turn -> tokenize with loss masks (assistant turns or all tokens) -> model
(full, LoRA, DoRA) -> trl SFTTrainer (padding-free batches, no cross-sample attention). The pipeline
(llmtune/pipeline.py) then evaluates before (loss, perplexity, token accuracy), trains, evaluates after and saves
with a generation config whose eos is the template's end-of-turn token; this task adds the perplexity of
`lm.perplexity_file` and greedy generations at every evaluation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, concatenate_datasets
from peft import TaskType
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import SFTConfig

from llmtune.config.schema import DataConfig, Recipe
from llmtune.data import tokenized_cache
from llmtune.data.files import read_text_file
from llmtune.data.formats import detect_format, text_column, to_conversations
from llmtune.data.lm_tokenize import (
    setup_chat_template,
    tokenize_conversations,
    tokenize_text_blocks,
)
from llmtune.data.loading import describe_source, load_file, load_splits
from llmtune.data.tokenized_cache import Tokenized
from llmtune.errors import LlmtuneError
from llmtune.inference.generation import GenerationLogger, perplexity, set_generation_eos
from llmtune.kernels.attention import attention_for
from llmtune.models.adapters import apply_method
from llmtune.models.loading import ensure_pad_token, load_tokenizer, pretrained_arguments
from llmtune.models.pruning import prune_layers
from llmtune.models.quantization import keep_adapters_in_compute_dtype
from llmtune.models.scratch import build_model, train_tokenizer
from llmtune.models.sources import ResolvedModel, cache_dir
from llmtune.patches.trl_labelled_logits import LMTrainer
from llmtune.run.distributed import main_process_first
from llmtune.run.precision import resolved_precision
from llmtune.run.training import early_stopping, training_arguments
from llmtune.tasks.job import Job

logger = logging.getLogger(__name__)


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


def prepare_data(recipe: Recipe, model_path: str | None,
                 loaded: tuple[Any, bool] | None = None) -> tuple[Any, bool, Tokenized]:
    """(tokenizer, whether it gained tokens, the tokenized splits): from the cache of finished splits when an earlier
    run read the same files with the same settings (llmtune/data/tokenized_cache.py), else loaded and tokenized
    (and then cached). `loaded`: what load_lm_tokenizer already returned for this recipe and data, used instead of
    loading the tokenizer here (the speed benchmark times the data alone); it fills the same cache entry."""
    key = tokenized_cache.cache_key(recipe, model_path)
    folder = cache_dir() / "tokenized"
    cached = tokenized_cache.load(folder, key) if key else None
    if cached is not None:
        tokenizer, added = loaded or load_lm_tokenizer(recipe, cached.chat, model_path)
        return tokenizer, added, cached
    lm_data = load_data(recipe)
    tokenizer, added = loaded or load_lm_tokenizer(recipe, lm_data.chat, model_path, lm_data)
    encoded, stats = tokenize_splits(recipe, lm_data, tokenizer)
    prepared = Tokenized(encoded, stats, lm_data.fmt, lm_data.loss_on)
    if key:
        tokenized_cache.save(folder, key, prepared)
    return tokenizer, added, prepared


def load_lm_tokenizer(recipe: Recipe, chat: bool, model_path: str | None,
                      lm_data: LMData | None = None) -> tuple[Any, bool]:
    """(tokenizer with pad token and chat template, whether tokens were added). With model.init=scratch a BPE
    tokenizer is trained on the training data (`lm_data`); otherwise the checkpoint's own is loaded."""
    if recipe.model.init == "scratch":
        assert lm_data is not None, "a tokenizer trained from scratch needs the training rows"
        train = internal_form(lm_data.splits["train"], lm_data.fmt, recipe.data, "the training data")
        corpus = (train["text"] if not lm_data.chat
                  else ("\n".join(m["content"] for m in row["messages"]) for row in train))
        tokenizer = train_tokenizer(iter(corpus), recipe.scratch.vocab_size)
        ensure_pad_token(tokenizer)
    else:
        tokenizer = load_tokenizer(model_path, recipe)
    added = setup_chat_template(tokenizer, recipe.lm.chat_template) if chat else False
    return tokenizer, added


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


def build(recipe: Recipe, source: ResolvedModel | None, run_dir: Path, resume: bool = False) -> Job:
    """Load, tokenize and wrap everything into a ready-to-train LMTrainer (nothing is trained yet).
    `source` is the resolved checkpoint, or None for a model built from scratch."""
    data, lm = recipe.data, recipe.lm
    model_path = source.path if source else None

    with main_process_first():  # other processes then read the caches the first one wrote
        # 1. Data: raw rows -> tokenizer (chat template, pad token) -> loss-masked conversations or text blocks,
        # reused as a whole from an earlier run of the same data, tokenizer and settings
        tokenizer, added_tokens, prepared = prepare_data(recipe, model_path)
    encoded, stats, chat = prepared.splits, prepared.stats, prepared.chat

    # 2. Model (pretrained, or built from scratch) with the attention kernel for its batches
    padding_free = chat and (lm.padding_free or lm.packing)  # text blocks are all max_length: nothing to remove
    attention = attention_for(recipe.model.attention, padding_free, resolved_precision(recipe.training.precision))
    if model_path is None:
        model = build_model(recipe.scratch, tokenizer)
        model.set_attn_implementation(attention)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation=attention,
                                                     **pretrained_arguments(recipe, model_path))
        model = prune_layers(model, recipe.model)  # model.keep_layers / num_layers
    if added_tokens:
        model.resize_token_embeddings(len(tokenizer))
    set_generation_eos(model, tokenizer, chat)

    # 3. Method: full, LoRA or DoRA (QLoRA: on the quantized base)
    model = apply_method(model, recipe.method, TaskType.CAUSAL_LM, recipe.training.gradient_checkpointing)

    # 4. Trainer: trl builds labels from the masks and batches samples end to end without cross-sample attention
    packing = lm.packing and chat  # text blocks are already full
    args = training_arguments(
        recipe, str(run_dir), "loss", "eval" in encoded, resume, SFTConfig, padded=chat and not padding_free,
        # Samples are truncated at tokenization; trl refuses a max_length it would not enforce (padding-free
        # batches without packing).
        max_length=data.max_length if packing or not padding_free else None,
        packing=packing,
        packing_strategy="bfd",
        padding_free=padding_free,
        completion_only_loss=False,  # the assistant masks already say what is trained
        assistant_only_loss=False,
        dataset_num_proc=data.preprocessing_workers,
        include_num_input_tokens_seen="non_padding",  # tokens per second on the console and in the report
    )
    callbacks: list[TrainerCallback] = early_stopping(recipe.training)
    if lm.generation_prompts:
        callbacks.append(GenerationLogger(run_dir / "generations.jsonl", lm.generation_prompts, lm.max_new_tokens, chat))
    trainer = LMTrainer(
        model=model,
        args=args,
        train_dataset=encoded["train"],
        eval_dataset=encoded.get("eval"),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    keep_adapters_in_compute_dtype(trainer.model, recipe.method)  # before the optimizer is built, at train()
    if packing:
        stats["train"]["packing_efficiency"] = packing_efficiency(encoded["train"], data.max_length)

    def score_perplexity_file(run_dir: Path) -> dict[str, Any]:
        text = read_text_file(lm.perplexity_file, "lm.perplexity_file")
        return {"perplexity_file": perplexity(trainer.model, tokenizer, text, data.max_length, lm.stride)}

    return Job(trainer, model_path, summarize=lm_metrics,
               record={"token_stats": stats, "format": prepared.fmt, "loss_on": prepared.loss_on},
               metrics={"data": stats},
               after_training=score_perplexity_file if lm.perplexity_file else None)


def validate(recipe: Recipe, source: ResolvedModel | None) -> dict[str, Any]:
    """What `llmtune validate` reports: the data format and its token statistics as training would see them."""
    lm_data = load_data(recipe)
    tokenizer, _ = load_lm_tokenizer(recipe, lm_data.chat, source.path if source else None, lm_data)
    _, stats = tokenize_splits(recipe, lm_data, tokenizer)
    return {"format": lm_data.fmt, "loss_on": lm_data.loss_on, "tokens": stats}


# --- pieces -------------------------------------------------------------------------------------------


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


def lm_metrics(raw: dict[str, float], prefix: str) -> dict[str, float]:
    loss = raw[f"{prefix}loss"]
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    # trl adds its token accuracy under "eval_" whatever the prefix asked of evaluate()
    for key in (f"{prefix}mean_token_accuracy", "eval_mean_token_accuracy"):
        if key in raw:
            metrics["token_accuracy"] = raw[key]
            break
    return metrics
