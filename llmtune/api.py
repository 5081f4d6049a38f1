"""The Python API: the same steps the CLI takes, as functions.

    from llmtune import load_recipe, build_trainer
    recipe = load_recipe("recipes/sst2_minilm_lora.yaml", ["training.epochs=1"])
    trainer = build_trainer(recipe)
    trainer.train()
    print(trainer.evaluate())
"""

from __future__ import annotations

from typing import Any

from llmtune import pipeline
from llmtune.config.loader import load_recipe
from llmtune.config.schema import Recipe

__all__ = ["load_recipe", "build_trainer", "train", "validate"]


def build_trainer(recipe: Recipe) -> Any:
    """A ready-to-train transformers Trainer for the recipe (seeded, data tokenized, model wrapped)."""
    return pipeline.build(recipe).job.trainer


def train(recipe: Recipe, resume: bool = False, overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Run the recipe end to end (train, evaluate, save, predict); returns the run's metrics.

    `resume` continues the run in output.dir from its newest complete checkpoint; `force` accepts settings that
    differ from the run's own when resuming."""
    return pipeline.train(recipe, resume=resume, overrides=overrides, force=force)


def validate(recipe: Recipe) -> dict[str, Any]:
    """Check that the recipe's model resolves and its data loads and tokenizes as configured; nothing is trained."""
    return pipeline.validate(recipe)
