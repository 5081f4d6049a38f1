"""Checkpoints that count only when complete, so a crash while saving never costs more than that one save.

transformers' Trainer writes `checkpoint-N/` file by file into its final name. A process killed halfway (kill -9,
OOM killer, a full disk, a node failure) leaves a folder that looks like a checkpoint and is not one. llmtune marks
each checkpoint complete only after the Trainer has written all of it - a small `llmtune_checkpoint.json` listing
every file and its size, written atomically as the last step - and from then on:

- `--resume` takes the newest complete checkpoint, says which, and removes the incomplete ones after it (naming
  what was missing), so the resumed run saves those steps again cleanly;
- old checkpoints are deleted (keeping `training.keep_checkpoints` and the best one) only after a newer one is
  complete, so a failed save always leaves the previous checkpoint in place;
- a save that fails (a full disk, a quota) is explained in one paragraph, with the checkpoint to resume from.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

from transformers import TrainerCallback

from llmtune.errors import LlmtuneError
from llmtune.run.distributed import barrier, is_main_process
from llmtune.run.files import make_public, write_json

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
MARKER = "llmtune_checkpoint.json"
TRAINER_STATE = "trainer_state.json"


def checkpoint_step(path: Path) -> int | None:
    suffix = path.name.removeprefix(PREFIX)
    return int(suffix) if path.name.startswith(PREFIX) and suffix.isdigit() else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-N folders, oldest step first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def why_incomplete(checkpoint: Path) -> str | None:
    """None when the checkpoint is complete, else what is wrong with it (for messages)."""
    if not checkpoint.is_dir():
        return "it does not exist"
    marker = checkpoint / MARKER
    if marker.is_file():
        try:
            files = json.loads(marker.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"its {MARKER} is damaged"
        for name, size in files.items():
            path = checkpoint / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size:,} of its {size:,} bytes"
        return None
    present = sorted(p.name for p in checkpoint.iterdir())
    if _marks_checkpoints(checkpoint.parent):
        return f"the save stopped before the end (no {MARKER}; it holds {', '.join(present) or 'nothing'})"
    # A run started before llmtune marked checkpoints: transformers writes trainer_state.json after the weights and
    # optimizer state, so a whole one means the rest was written.
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return f"the save stopped before the end (no whole {TRAINER_STATE}; it holds {', '.join(present) or 'nothing'})"
    return None


def _marks_checkpoints(run_dir: Path) -> bool:
    """Whether this run marks its complete checkpoints (every run since the marker exists says so in run.json)."""
    try:
        return "checkpoint_marker" in json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return True


def mark_complete(checkpoint: Path) -> None:
    """Record every file of a finished checkpoint with its size, after flushing each to disk; the marker is written
    last, atomically - so a marked checkpoint survives a crash of the machine too, not only of the process."""
    make_public(checkpoint)
    files = {}
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file() and path.name != MARKER:
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
            files[str(path.relative_to(checkpoint))] = path.stat().st_size
    write_json(checkpoint / MARKER, {"step": checkpoint_step(checkpoint), "files": files})


def newest_complete(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint, and the newer incomplete ones skipped on the way (with the reason)."""
    skipped = []
    for checkpoint in reversed(list_checkpoints(run_dir)):
        problem = why_incomplete(checkpoint)
        if problem is None:
            return checkpoint, skipped
        skipped.append((checkpoint, problem))
    return None, skipped


def prepare_resume(run_dir: Path) -> Path:
    """The checkpoint to resume from. Incomplete checkpoints after it are removed (their steps are trained and
    saved again); a run with no complete checkpoint is refused with what to do instead."""
    checkpoint, skipped = newest_complete(run_dir)
    for path, problem in skipped:
        logger.warning("Skipping %s: incomplete (%s).", path.name, problem)
    if checkpoint is None:
        found = "; ".join(f"{p.name}: {why}" for p, why in skipped) or "no checkpoint-N folder at all"
        raise LlmtuneError(
            f"--resume: '{run_dir}' holds no complete checkpoint to continue from ({found}). The run stopped before "
            "its first checkpoint was saved whole, so it must start again: run the same command without --resume "
            "and with output.overwrite=true (this replaces the contents of that folder), or choose another output.dir."
        )
    barrier()  # every process has looked before the main one removes anything
    if is_main_process():
        for path, _ in skipped:
            shutil.rmtree(path, ignore_errors=True)
    barrier()
    logger.info("Resuming from %s (step %d).", checkpoint.name, checkpoint_step(checkpoint))
    return checkpoint


def rotate(run_dir: Path, keep: int, best: str | None) -> None:
    """Delete checkpoints beyond the newest `keep` complete ones (never the best one), and incomplete leftovers
    older than the newest complete checkpoint."""
    checkpoints = list_checkpoints(run_dir)
    complete = [p for p in checkpoints if why_incomplete(p) is None]
    if not complete:
        return
    kept = {p.resolve() for p in complete[-keep:]} | ({Path(best).resolve()} if best else set())
    for path in checkpoints:
        if checkpoint_step(path) <= checkpoint_step(complete[-1]) and path.resolve() not in kept:
            shutil.rmtree(path, ignore_errors=True)


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once the Trainer has saved all of it, then rotates old ones; makes sure the
    training loss is logged at every save and at the end (a resumed run can then report its whole-run loss)."""

    def __init__(self, run_dir: Path, keep: int):
        self.run_dir, self.keep = run_dir, keep
        self.saving_step: int | None = None

    def _before_save(self, state, control) -> None:
        if control.should_save or control.should_training_stop:
            control.should_log = True
        if control.should_save:
            self.saving_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self._before_save(state, control)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_save(state, control)
        return control

    def on_save(self, args, state, control, **kwargs):
        barrier()  # under FSDP / DeepSpeed every rank writes its shards; all of them must be done
        if state.is_world_process_zero:
            mark_complete(self.run_dir / f"{PREFIX}{state.global_step}")
            rotate(self.run_dir, self.keep, state.best_model_checkpoint)
        self.saving_step = None
        return control


def save_failure(exc: BaseException, run_dir: Path, step: int) -> LlmtuneError:
    """Explain a checkpoint save that failed: why, what was cleaned up, and where to resume from.

    The half-written checkpoint is removed (it is not resumable and takes the space that is missing). The reason
    is worked out first: removing the checkpoint frees space, and the free space the message reports must be
    what the save met, or a full disk reads as one with room."""
    reason = describe_write_error(exc, run_dir)
    partial = run_dir / f"{PREFIX}{step}"
    removed = ""
    if partial.is_dir() and why_incomplete(partial) is not None and is_main_process():
        shutil.rmtree(partial, ignore_errors=True)
        removed = f" The unfinished {PREFIX}{step} was removed."
    newest, _ = newest_complete(run_dir)
    resume = (f"The newest complete checkpoint, {newest.name}, is intact: once there is room, continue with the "
              "same command plus --resume." if newest else
              "There is no complete checkpoint yet; once there is room, run the same command again with "
              "output.overwrite=true.")
    return LlmtuneError(f"Saving checkpoint {PREFIX}{step} in '{run_dir}' failed: {reason}.{removed} {resume}")


# How each writer says the disk is full: errno 28 in Python, Rust's io::Error (safetensors) in words.
OUT_OF_SPACE = ("No space left", "os error 28", "StorageFull")
OUT_OF_QUOTA = ("Disk quota exceeded", "os error 122", "QuotaExceeded")
# torch.save's C++ zip writer reports a short write only as a stream failure or a position mismatch, without
# the errno; the usual cause is a full disk or quota.
SHORT_WRITE = ("unexpected pos", "file write failed", "iostream error")
LITTLE_ROOM = 2**30  # below this, a short write is the disk filling up (a checkpoint file is typically larger)


def describe_write_error(exc: BaseException, folder: Path) -> str:
    """'the disk holding '<folder>' is full (N MiB free)' when the error or the filesystem says so, else the
    error itself with the free space there."""
    chain, current = [], exc
    while current is not None and len(chain) < 5:
        chain.append(current)
        current = current.__cause__ or current.__context__
    codes = {getattr(e, "errno", None) for e in chain}
    text = " ".join(str(e) for e in chain)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    room = f"{free / 2**20:,.0f} MiB free" if free is not None else "free space unknown"
    if errno.ENOSPC in codes or any(words in text for words in OUT_OF_SPACE):
        return f"the disk holding '{folder}' is full ({room})"
    if errno.EDQUOT in codes or any(words in text for words in OUT_OF_QUOTA):
        return f"your disk quota on the disk holding '{folder}' is used up ({room} on the disk)"
    if any(words in text for words in SHORT_WRITE):
        if free is None or free < LITTLE_ROOM:
            return f"the disk holding '{folder}' is full ({room})"
        return (f"a file was written short ({str(exc).strip()}) although the disk holding '{folder}' has {room}: "
                "most likely your disk quota there is used up, or the disk was full and space has been freed since")
    if errno.EFBIG in codes:
        return f"a file grew past the size limit for this process or filesystem ({exc}; {room} there)"
    return f"{type(exc).__name__}: {exc} ({room} there)"
