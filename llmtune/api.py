"""The Python API: the same steps the CLI takes, as functions.

    from llmtune import load_recipe, build_trainer
    recipe = load_recipe("recipes/sst2_minilm_lora.yaml", ["training.epochs=1"])
    trainer = build_trainer(recipe)
    trainer.train()
    print(trainer.evaluate())
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from llmtune.config.loader import load_recipe
from llmtune.config.schema import Recipe
from llmtune.data.loading import load_splits
from llmtune.models.sources import resolve_model
from llmtune.tasks import causal_lm, classification

TASK_MODULES = {"classification": classification, "sft": causal_lm, "pretrain": causal_lm}

__all__ = ["load_recipe", "build_trainer", "train", "validate"]


def build_trainer(recipe: Recipe) -> Trainer:
    """A ready-to-train transformers Trainer for the recipe (data tokenized, model wrapped)."""
    return TASK_MODULES[recipe.task].build(recipe).trainer


def train(recipe: Recipe, resume: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe end to end (train, evaluate, save, predict); returns the run's metrics."""
    return TASK_MODULES[recipe.task].run(recipe, resume=resume, overrides=overrides)


def validate(recipe: Recipe) -> dict[str, Any]:
    """Check that the recipe's model resolves and its data loads and tokenizes as configured; nothing is trained."""
    if recipe.task != "classification":
        lm_data = causal_lm.load_data(recipe)
        tokenizer, _, _, model_path = causal_lm.load_tokenizer(recipe, lm_data)
        _, stats = causal_lm.tokenize_splits(recipe, lm_data, tokenizer)
        return {"task": recipe.task, "model": model_path or "from scratch", "format": lm_data.fmt,
                "loss_on": lm_data.loss_on, "method": recipe.method.type, "tokens": stats}
    source = resolve_model(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
    splits = load_splits(recipe.data, recipe.training.seed)
    labels, _ = classification.check_data(splits, recipe.data)
    return {
        "task": recipe.task,
        "model": {"name": recipe.model.name, "resolved": source.path, "source": source.kind},
        "method": recipe.method.type,
        "rows": {split: len(rows) for split, rows in splits.items()},
        "labels": labels,
    }
