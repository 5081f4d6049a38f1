"""Trainer callbacks every task gets: stopping cleanly on a signal, noticing a run that cannot have learned; and,
where a recipe asks, handing freed heap memory back to the OS on a CPU.

(Checkpoint completeness lives in checkpoints.py; task-specific callbacks, such as logging generations, live with
their task.)
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from llmtune.patches.interruptible_evaluation import EvaluationInterrupted, interruptible_evaluations
from llmtune.run.distributed import any_rank, launched_with

logger = logging.getLogger(__name__)

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class StopOnSignal(TrainerCallback):
    """First Ctrl-C or SIGTERM: finish the current step, save a resumable checkpoint, stop.

    A signal during an evaluation inside training ends the evaluation at the next batch (given the `trainer`, see
    patches/interruptible_evaluation.py), then the checkpoint is saved: an evaluation can take longer than a
    scheduler's grace period. A second Ctrl-C aborts at once. After SIGTERM, `grace_seconds` (when set) bounds the
    wait: a step and save that take longer end the process anyway (exit 143), leaving the previous complete
    checkpoint. Under a multi-process launch the ranks agree at every step end (and evaluation batch) whether any
    of them was signalled, so they stop at the same point.
    """

    def __init__(self, grace_seconds: int | None = None, trainer: Any = None) -> None:
        self.grace_seconds = grace_seconds
        self.trainer = trainer
        self.signum: int | None = None  # the signal this process received
        self.requested = False  # whether training stopped because some process was signalled
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None
        self._undo_patch: Callable[[], None] | None = None
        self._saved_step: int | None = None  # the step of the checkpoint saved since the stop request

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNAL_NAMES:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        if self.trainer is not None:
            self._undo_patch = interruptible_evaluations(self.trainer, lambda step: step == self._saved_step)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._undo_patch is not None:
            self._undo_patch()
            self._undo_patch = None
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
            control.should_evaluate = False  # an evaluation now would only delay the save the signal asked for
            control.should_log = True  # the loss since the last log goes into the checkpoint, as at every save
        return control

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.trainer is not None and any_rank(self.signum is not None):
            self.requested = True
            raise EvaluationInterrupted
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.requested:
            self._saved_step = state.global_step
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.requested:  # the epoch's end after a stop: its evaluation and save are not wanted, or were done
            control.should_evaluate = False
            control.should_save = control.should_save and self._saved_step != state.global_step
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


class ReleaseFreedMemory(TrainerCallback):
    """After optimizer steps on a CPU, return the pages glibc's heap holds free to the OS (`malloc_trim`).

    Tensors freed by a step stay with the allocator for later requests, but a run's batches differ in shape, and
    the holes one step leaves rarely fit the next step's tensors, so the resident set climbs step after step above
    what training holds. In llmtune's DPO LoRA worker on SmolLM2 (33 steps, 2-core EPYC with avx512_bf16) it rose
    from 2.6 GB after the first step to 3.71 GB; trimming after every step kept the peak at 3.46 GB (a trim took
    83 ms, 2.4% of a 3.5 s step), while trimming after every other step kept 3.66 GB. A trim
    takes time in proportion to the heap, so it runs only as often as keeps it under `SHARE` of the training time.
    The next step then faults the released pages back in, a cost the trim's own time does not show: SFT LoRA's
    short steps ran 10% slower for 3% less memory. So it is opt-in (`training.release_memory`), on in the DPO
    recipes. Nothing is done off glibc or on an accelerator."""

    SHARE = 0.03

    def __init__(self) -> None:
        self._trim = _glibc_malloc_trim()
        self._cost, self._since = 0.0, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if args.device.type != "cpu":
            self._trim = None
        self._since = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        start = time.perf_counter()
        if self._trim is None or (start - self._since) * self.SHARE < self._cost:
            return
        self._trim(0)
        self._since = time.perf_counter()
        self._cost = self._since - start


def _glibc_malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none (macOS, musl, Windows)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own symbols, libc's among them
    except (OSError, TypeError):  # Windows has no such handle
        return None
