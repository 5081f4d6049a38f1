"""A stop signal (Ctrl-C, SIGTERM) that arrives during an evaluation inside training ends that evaluation at once,
and the run saves its checkpoint and stops as it does for a signal during a training step.

transformers gives callbacks no way to end an evaluation: `on_prediction_step` runs after every batch, but the
control flags it sets are read only once the whole evaluation is over. An evaluation of thousands of rows then
runs on past a scheduler's grace period (Slurm, Kubernetes) and the job is killed without the checkpoint the
signal asked for. So llmtune's StopOnSignal raises EvaluationInterrupted from `on_prediction_step`, and this patch
wraps the Trainer's private `_maybe_log_save_evaluate` (where it logs, evaluates and saves after a step or an
epoch) to catch it and then take the path of a stop at a step end: no evaluation, the Trainer's own checkpoint
save (with its on_save callbacks, so the checkpoint is marked complete), stop. The interrupted evaluation records
no metrics: numbers from part of the evaluation set would read as a real evaluation.
Canary: tests/test_faults_more.py::test_transformers_still_logs_evaluates_and_saves_in_maybe_log_save_evaluate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from llmtune.patches import applied

logger = logging.getLogger(__name__)


class EvaluationInterrupted(Exception):
    """Raised inside an evaluation to end it at once, after a stop signal."""


def interruptible_evaluations(trainer: Any, saved_at: Callable[[int], bool]) -> Callable[[], None]:
    """Let EvaluationInterrupted end an evaluation during `trainer.train()`; then save a checkpoint (unless
    `saved_at(step)` says this step's is already saved) and stop. Returns the function that undoes this."""
    applied(__name__)
    original = trainer._maybe_log_save_evaluate

    def log_save_evaluate(*args: Any, **kwargs: Any) -> None:
        try:
            return original(*args, **kwargs)
        except EvaluationInterrupted:
            step = trainer.state.global_step
            logger.warning("Evaluation at step %d interrupted by the stop request; it records no metrics.", step)
            control = trainer.control
            control.should_evaluate = False
            control.should_log = True  # the loss since the last log goes into the checkpoint, as at every save
            control.should_save = not saved_at(step)
            control.should_training_stop = True
            return original(*args, **kwargs)

    trainer._maybe_log_save_evaluate = log_save_evaluate
    return lambda: vars(trainer).pop("_maybe_log_save_evaluate", None)
