"""What a task hands the pipeline once it is built: a ready-to-train Trainer and the few facts around it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Job:
    trainer: Any  # a transformers Trainer (or trl's SFTTrainer), data tokenized, model wrapped
    model_path: str | None  # the pretrained checkpoint it started from (adapters are saved against it)
    summarize: Callable[[dict[str, float], str], dict[str, Any]]  # Trainer metrics (with a prefix) -> task's names
    record: dict[str, Any] = field(default_factory=dict)  # task facts for run.json (labels, data sizes, ...)
    metrics: dict[str, Any] = field(default_factory=dict)  # task facts for metrics.json known before training
    # After training, before saving: extra outputs (a predictions file, a perplexity score) -> metrics to add.
    after_training: Callable[[Path], dict[str, Any]] | None = None
    # Once the run directory is claimed, before the first step: a baseline the task measures itself (grpo's
    # held-out replies). A resumed run calls it again: the weights are still the starting ones then.
    before_training: Callable[[Path], None] | None = None
