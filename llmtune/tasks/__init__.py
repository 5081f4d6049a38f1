"""The tasks llmtune trains. Each module tells one linear story - data -> tokenizer -> model -> trainer - and
fills in the `Task` protocol: `build(recipe, source, run_dir, resume) -> Job`, plus `validate(recipe, source)` for
`llmtune validate`. Everything the tasks share (seeding, the run directory, training, checkpoints, saving,
reporting, publishing) is the pipeline's.

Modules are imported when their task is asked for, so choosing a task costs nothing until it runs;
tests/test_architecture.py checks that every task of the recipe vocabulary has a module that fills in the protocol.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    from llmtune.config.schema import Recipe
    from llmtune.models.sources import ResolvedModel
    from llmtune.tasks.job import Job

TASK_MODULES = {"classification": "llmtune.tasks.classification", "distill": "llmtune.tasks.distill",
                "image_classification": "llmtune.tasks.image_classification", "sft": "llmtune.tasks.causal_lm",
                "pretrain": "llmtune.tasks.causal_lm", "dpo": "llmtune.tasks.preference",
                "kto": "llmtune.tasks.preference", "orpo": "llmtune.tasks.preference",
                "simpo": "llmtune.tasks.preference", "reward": "llmtune.tasks.reward", "grpo": "llmtune.tasks.grpo"}


class Task(Protocol):
    def build(self, recipe: Recipe, source: ResolvedModel | None, run_dir: Path, resume: bool = False) -> Job:
        """Data, tokenizer, model and a ready-to-train Trainer (nothing written, nothing trained)."""

    def validate(self, recipe: Recipe, source: ResolvedModel | None) -> dict[str, Any]:
        """What `llmtune validate` reports: the data as training would read it."""

    # Optional: `check_before_loading(recipe)` - the task's own files and runs exist (checked before any model
    # loads, beside the pipeline's own checks); grpo's reward functions and reward runs.


def task_module(task: str) -> Task:
    """The module that trains `task` (a name the recipe loader already checked against config.vocab.TASKS)."""
    return cast(Task, importlib.import_module(TASK_MODULES[task]))
