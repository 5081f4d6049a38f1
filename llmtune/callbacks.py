"""Trainer callbacks every task gets: stopping cleanly on a signal, and noticing a run that cannot have learned.

(Checkpoint completeness lives in checkpoints.py; task-specific callbacks, such as logging generations, live with
their task.)
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch
from transformers import TrainerCallback

from llmtune.distributed import any_rank, launched_with

logger = logging.getLogger(__name__)

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class StopOnSignal(TrainerCallback):
    """First Ctrl-C or SIGTERM: finish the current step, save a resumable checkpoint, stop.

    A second Ctrl-C aborts at once. After SIGTERM, `grace_seconds` (when set) bounds the wait: a step and save that
    take longer end the process anyway (exit 143), leaving the previous complete checkpoint. Under a multi-process
    launch the ranks agree at every step end whether any of them was signalled, so they stop at the same step.
    """

    def __init__(self, grace_seconds: int | None = None) -> None:
        self.grace_seconds = grace_seconds
        self.signum: int | None = None  # the signal this process received
        self.requested = False  # whether training stopped because some process was signalled
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNAL_NAMES:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # a repeated SIGTERM changes nothing: the save is under way
        self.signum = signum
        logger.warning("%s: saving a checkpoint after this step, then stopping%s.", SIGNAL_NAMES[signum],
                       " (press Ctrl-C again to abort now)" if signum == signal.SIGINT else "")
        if signum == signal.SIGTERM and self.grace_seconds:
            self._timer = threading.Timer(self.grace_seconds, self._out_of_time)
            self._timer.daemon = True
            self._timer.start()

    def _out_of_time(self) -> None:
        logger.error("SIGTERM grace of %d s is over before the checkpoint was saved; exiting without it (the previous "
                     "complete checkpoint stays; resume from it with --resume).", self.grace_seconds)
        logging.shutdown()
        os._exit(128 + signal.SIGTERM)

    def on_step_end(self, args, state, control, **kwargs):
        if any_rank(self.signum is not None):
            self.requested = True
            control.should_save = True
            control.should_training_stop = True
        return control


def _fingerprint(model: torch.nn.Module) -> list[tuple[float, float]] | None:
    """Sum and norm of every trainable weight; None where weights are sharded across processes (FSDP, DeepSpeed
    ZeRO-3 leave each rank an empty or partial tensor, and comparing those says nothing)."""
    if launched_with("FSDP") or launched_with("DEEPSPEED"):
        return None
    with torch.no_grad():
        return [(p.sum(dtype=torch.float64).item(), torch.linalg.vector_norm(p, dtype=torch.float64).item())
                for p in model.parameters() if p.requires_grad]


class TrainingSanity(TrainerCallback):
    """Warns when a run cannot have learned anything: its learning rate stayed at ~0 (e.g. a one-step run whose
    warm-up starts at 0), or none of its trainable weights changed. Both facts go into metrics.json. A train()
    call that runs no step (a resumed run that was already at its end) is not judged."""

    def __init__(self, peak_learning_rate: float) -> None:
        self.peak = peak_learning_rate
        self.max_learning_rate: float | None = None
        self.weights_changed: bool | None = None
        self._start: list[tuple[float, float]] | None = None
        self._steps = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._start = _fingerprint(model) if model is not None else None
        self._steps, self.max_learning_rate, self.weights_changed = 0, None, None

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._steps += 1
        if optimizer is not None:
            rate = float(optimizer.param_groups[0]["lr"])
            self.max_learning_rate = max(self.max_learning_rate or 0.0, rate)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._steps == 0:
            return
        if model is not None and self._start is not None:
            self.weights_changed = _fingerprint(model) != self._start
        if self.max_learning_rate is not None and self.max_learning_rate <= self.peak * 1e-3:
            logger.warning(
                "The learning rate never rose above %.3g over %d step(s) (peak set: %g), so training changed "
                "(almost) nothing. With few steps, warm-up keeps it near 0: lower training.warmup or train longer.",
                self.max_learning_rate, self._steps, self.peak)
        if self.weights_changed is False:
            logger.warning("No trainable weight changed during training: check the learning rate, the data and "
                           "which weights are trainable (method.*).")

    def report(self) -> dict[str, float | bool | None]:
        return {"max_learning_rate": self.max_learning_rate, "weights_changed": self.weights_changed}
