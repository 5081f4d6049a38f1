"""One sweep trial: `llmtune train` in its own process and session, its evaluations reported to Optuna as they
are logged, and - however the sweep ends (pruning, a signal, an error, even SIGKILL on Linux) - never left running:
SIGTERM first (the trial saves a checkpoint), SIGKILL after a grace period."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# How long a trial stopped by the sweep (pruned, or the sweep itself stopping) gets to save its checkpoint before it
# is killed, when the recipe sets no training.stop_grace_seconds.
STOP_SECONDS = 120
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
PR_SET_PDEATHSIG = 1  # prctl option, from <linux/prctl.h>

@dataclasses.dataclass
class Sweep:
    recipe_path: str
    overrides: list[str]
    out: Path
    trials: int
    accelerate: str | None = None
    # Seconds a trial the sweep stops gets to save its checkpoint before it is killed; None: the recipe's
    # training.stop_grace_seconds plus a margin, else STOP_SECONDS.
    stop_seconds: float | None = None


def run_trial(sweep: Sweep, trial: Any, metric: str, logged_as: str) -> tuple[Any, float | None, float]:
    """Train one trial in its own process, reporting each evaluation (where the metric is logged under
    `logged_as`); (state, final metric from metrics.json, seconds). However this returns or raises, the trial's
    process is not left running."""
    from optuna.trial import TrialState

    run_dir = sweep.out / f"trial-{trial.number:03d}"
    log_path = sweep.out / f"trial-{trial.number:03d}.log"
    command = trial_command(sweep, trial, run_dir)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        # Its own session: Ctrl-C at the terminal reaches the sweep only, which stops the trial with SIGTERM (a
        # checkpoint) rather than the trainer's Ctrl-C; and one killpg reaches an accelerate launch's workers too.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_stop_with_parent())
        try:
            pruned = _watch(process, trial, run_dir, logged_as)
        finally:
            if process.poll() is None:  # pruned, or the sweep is stopping (a signal, an error)
                stop_trial(process, STOP_SECONDS if sweep.stop_seconds is None else sweep.stop_seconds)
    seconds = time.perf_counter() - start
    if pruned:
        return TrialState.PRUNED, None, seconds
    value = _final_metric(run_dir / "metrics.json", metric) if process.returncode == 0 else None
    if value is None:
        logger.warning("Trial %d failed (exit %d); its output is in %s", trial.number, process.returncode, log_path)
        return TrialState.FAIL, None, seconds
    return TrialState.COMPLETE, value, seconds


def _watch(process: subprocess.Popen, trial: Any, run_dir: Path, logged_as: str) -> bool:
    """Report the trial's evaluations while it runs; whether the pruner stopped it (then it is still running)."""
    # Imported only now: the console module pulls in transformers (seconds), which the sweep process never uses.
    from llmtune.observe.console import EVALUATIONS_FILE

    evaluations, seen = run_dir / EVALUATIONS_FILE, 0
    while process.poll() is None:
        time.sleep(1.0)
        seen, pruned = _report(trial, evaluations, logged_as, seen)
        if pruned:
            return True
    _report(trial, evaluations, logged_as, seen)
    return False


def stop_trial(process: subprocess.Popen, grace_seconds: float) -> None:
    """SIGTERM to the trial's process group (llmtune train saves a checkpoint and exits 143); SIGKILL when it
    has not ended after `grace_seconds`, or at once on a second signal or any other exception meanwhile."""
    logger.info("Stopping the running trial: SIGTERM sent, waiting up to %.0f s for it to save a checkpoint.",
                grace_seconds)
    try:
        _signal_group(process, signal.SIGTERM)
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        logger.warning("The trial did not stop within %.0f s of SIGTERM; killing it.", grace_seconds)
    finally:
        if process.poll() is None:
            _signal_group(process, signal.SIGKILL)
            process.wait()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:  # it ended between the check and the signal
        pass


def _stop_with_parent() -> Callable[[], None] | None:
    """On Linux, what the trial's process runs before it starts: the kernel then sends it SIGTERM when the sweep
    dies, even by SIGKILL, which no handler in the sweep can see."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # Looked up here, in the sweep: the forked child should only call it, not load anything.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, term = os.getpid(), int(signal.SIGTERM)

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, term)
        if os.getppid() != parent:  # the sweep died before the signal was armed
            os._exit(128 + term)

    return arm


def _final_metric(path: Path, metric: str) -> float | None:
    """The trial's metric after training, from its metrics.json; None when it is missing or unreadable."""
    try:
        value = json.loads(path.read_text()).get("after", {}).get(metric)
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def trial_command(sweep: Sweep, trial: Any, run_dir: Path) -> list[str]:
    """The trial's `llmtune train` command line, exactly as a user would type it."""
    command = [sys.executable, "-m", "llmtune", "train", sweep.recipe_path, *sweep.overrides,
               *(_override(k, v) for k, v in trial.params.items()), f"output.dir={run_dir}"]
    return command + ["--accelerate", sweep.accelerate] if sweep.accelerate else command


def _report(trial: Any, evaluations: Path, metric: str, seen: int) -> tuple[int, bool]:
    """Report the evaluations logged since the last look; whether the pruner stops the trial."""
    if not evaluations.is_file():
        return seen, False
    lines = evaluations.read_text().splitlines()
    complete = [line for line in lines if line.endswith("}")]  # a line still being written waits for the next look
    for line in complete[seen:]:
        entry = json.loads(line)
        value = entry.get(metric)
        # Step 0 is the untrained model, the same for every trial; 'after' repeats the best evaluation.
        if entry.get("split") == "eval" and value is not None and entry["step"] > 0:
            trial.report(float(value), entry["step"])
            if trial.should_prune():
                return len(complete), True
    return len(complete), False


def _override(key: str, value: Any) -> str:
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"
