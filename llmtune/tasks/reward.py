"""Reward models: one score per text, trained on preference pairs so that the chosen reply scores higher.

The story, top to bottom: load the pairs (any layout the preference tasks read) -> tokenizer -> prompt + reply as
the model reads it (a decoder: its chat template; an encoder: plain text, prompt and reply as a sentence pair),
truncated from the left so the reply's end - where a decoder's score is read - always stays -> a sequence
classifier with one output (full, LoRA, QLoRA) -> trl's RewardTrainer. The pipeline evaluates the held-out pairs
before and after: pairwise accuracy (chosen scores higher) and mean margin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset
from peft import TaskType
from transformers import AutoModelForSequenceClassification

from llmtune.config.schema import Recipe
from llmtune.data.preference import as_text, chat_prompt_tokens, load_preference_splits
from llmtune.models.adapters import apply_method
from llmtune.models.loading import load_tokenizer, pretrained_arguments
from llmtune.models.pruning import prune_layers
from llmtune.models.sources import ResolvedModel
from llmtune.run.distributed import main_process_first
from llmtune.run.training import early_stopping
from llmtune.tasks.job import Job
from llmtune.tasks.preference_trainers import build_trainer, summarize

SCORE_HEADS = ["classifier", "score"]  # head names across encoders and decoders; trained in full precision


def build(recipe: Recipe, source: ResolvedModel | None, run_dir: Path, resume: bool = False) -> Job:
    """Load, tokenize and wrap everything into a ready-to-train RewardTrainer (nothing is trained yet)."""
    assert source is not None, "rules.py refuses model.init=scratch for reward models"
    data = recipe.data

    # 1. Tokenizer, pairs, and each side tokenized as the model will score it
    with main_process_first():
        tokenizer = load_tokenizer(source.path, recipe)
        splits, layout, dropped = read_pairs(recipe, tokenizer)
        encoded = {split: encode_pairs(rows, tokenizer, data.max_length) for split, rows in splits.items()}

    # 2. Model: the checkpoint with a one-output head, then full / LoRA / DoRA
    model = AutoModelForSequenceClassification.from_pretrained(
        source.path, num_labels=1, **pretrained_arguments(recipe, source.path, keep_unquantized=SCORE_HEADS)
    )
    model.config.pad_token_id = tokenizer.pad_token_id  # decoders read the score at the last real token
    model = prune_layers(model, recipe.model)  # model.keep_layers / num_layers
    model = apply_method(model, recipe.method, TaskType.SEQ_CLS, recipe.training.gradient_checkpointing)

    # 3. trl's RewardTrainer (pairwise loss, accuracy and margin at evaluation)
    trainer = build_trainer(recipe, model, tokenizer, encoded["train"], encoded.get("eval"), run_dir, resume,
                            early_stopping(recipe.training))
    sizes = {split: len(rows) for split, rows in splits.items()}
    return Job(trainer, source.path, summarize=summarize("reward"),
               record={"format": layout, "rows": sizes, "dropped": dropped},
               metrics={"data": {"rows": sizes, "dropped": dropped}})


def validate(recipe: Recipe, source: ResolvedModel | None) -> dict[str, Any]:
    assert source is not None
    tokenizer = load_tokenizer(source.path, recipe)
    splits, layout, dropped = read_pairs(recipe, tokenizer)
    return {"format": layout, "rows": {s: len(r) for s, r in splits.items()}, "dropped": dropped}


# --- pieces -------------------------------------------------------------------------------------------------


def read_pairs(recipe: Recipe, tokenizer: Any) -> tuple[dict[str, Dataset], str, dict]:
    if tokenizer.chat_template:
        count = chat_prompt_tokens(tokenizer)
    else:
        def count(prompt: list[dict[str, str]]) -> int:
            return len(tokenizer(as_text(prompt))["input_ids"])
    return load_preference_splits(recipe.data, recipe.training.seed, True, count, recipe.pref.max_prompt_length)


def encode_pairs(rows: Dataset, tokenizer: Any, max_length: int) -> Dataset:
    """chosen_ids / rejected_ids: prompt + reply as the model scores them, at most max_length tokens (the oldest
    tokens go first)."""
    def encode(row: dict[str, Any]) -> dict[str, list[int]]:
        return {f"{side}_ids": reply_ids(tokenizer, row["prompt"], row[side], max_length)
                for side in ("chosen", "rejected")}

    return rows.map(encode, remove_columns=rows.column_names, desc="Tokenizing pairs")


def reply_ids(tokenizer: Any, prompt: list[dict[str, str]], reply: list[dict[str, str]], max_length: int
              ) -> list[int]:
    """A conversation and its reply as a reward model reads them: through the chat template (a decoder), else as
    a (conversation, reply) text pair; at most max_length tokens, the oldest dropped first."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=True)["input_ids"]
        return ids[-max_length:]
    ids = tokenizer(as_text(prompt), reply[0]["content"])["input_ids"]
    if len(ids) > max_length:  # keep [CLS]-style first token, drop the oldest prompt tokens
        ids = ids[:1] + ids[len(ids) - max_length + 1:]
    return ids
