"""The tasks llmtune trains. Each module tells one linear story - data -> tokenizer -> model -> trainer - in
`build(recipe, source, run_dir) -> Job`, plus `validate(recipe, source)` for `llmtune validate`. Everything the
tasks share (seeding, the run directory, training, checkpoints, saving, reporting, publishing) is the pipeline's.

Modules are imported when their task is asked for, so choosing a task costs nothing until it runs.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from llmtune.config.vocab import TASKS

TASK_MODULES = {"classification": "llmtune.tasks.classification", "distill": "llmtune.tasks.distill",
                "image_classification": "llmtune.tasks.image_classification", "sft": "llmtune.tasks.causal_lm",
                "pretrain": "llmtune.tasks.causal_lm", "dpo": "llmtune.tasks.preference",
                "kto": "llmtune.tasks.preference", "orpo": "llmtune.tasks.preference",
                "simpo": "llmtune.tasks.preference", "reward": "llmtune.tasks.reward"}
assert set(TASK_MODULES) == set(TASKS), "every task in the recipe vocabulary needs a module"


def task_module(task: str) -> ModuleType:
    return importlib.import_module(TASK_MODULES[task])
