"""Which process trains a run, and how it ended: `process.json` in the run directory.

Written by the main process when it claims the run directory (again on each --resume, keeping the first start and
the seconds trained before) and once more when training ends - finished, stopped on a signal (with its exit code) or
failed (with llmtune's one-paragraph message). A run whose record says it started but never ended is running if that
process is still alive (same pid and start time, so a reused pid does not count), and otherwise was killed (kill -9,
out of memory, power loss). `llmtune ui` and anything else that lists runs read this file instead of asking the
process that wrote it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmtune.errors import LlmtuneError, TrainingStopped
from llmtune.run.files import read_json_object, write_json

PROCESS_FILE = "process.json"


def process_started(pid: int) -> float | None:
    """When the process with this pid started (seconds since the epoch), or None if there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def is_alive(pid: int | None, started: float | None) -> bool:
    """Whether `pid` is the same live process that started at `started` (a reused pid is another process)."""
    import psutil

    if not pid:
        return False
    try:
        process = psutil.Process(pid)
        actual, status = process.create_time(), process.status()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False
    return status != psutil.STATUS_ZOMBIE and (started is None or abs(actual - started) < 2.0)


@contextmanager
def recorded_process(run_dir: Path, main: bool) -> Iterator[None]:
    """Record this process in process.json for the duration of training (the main process only)."""
    if not main:
        yield
        return
    pid = os.getpid()
    earlier = read_process_record(run_dir)  # a resumed run: its first start and the time trained before
    now = time.time()
    record: dict[str, Any] = {"pid": pid, "host": socket.gethostname(), "process_started": process_started(pid),
                              "started": now, "first_started": earlier.get("first_started", earlier.get("started", now)),
                              "seconds_before": earlier.get("seconds", earlier.get("seconds_before", 0.0)),
                              "state": "running"}
    write_json(run_dir / PROCESS_FILE, record)
    try:
        yield
    except TrainingStopped as stop:
        _ended(run_dir, record, "stopped", exit_code=stop.exit_code, message=str(stop))
        raise
    except BaseException as error:  # llmtune's own paragraph as it is; anything else named by its type
        message = str(error) if isinstance(error, LlmtuneError) else f"{type(error).__name__}: {error}"
        _ended(run_dir, record, "failed", exit_code=1, message=message)
        raise
    _ended(run_dir, record, "finished", exit_code=0)


def _ended(run_dir: Path, record: dict[str, Any], state: str, exit_code: int, message: str = "") -> None:
    try:
        ended = time.time()
        write_json(run_dir / PROCESS_FILE, {**record, "state": state, "ended": ended, "exit_code": exit_code,
                                            "seconds": record["seconds_before"] + ended - record["started"],
                                            **({"message": message} if message else {})})
    except OSError:
        pass  # a full disk must not hide the error that ended the run


def read_process_record(run_dir: Path) -> dict[str, Any]:
    """The run's process.json ({} when there is none yet)."""
    return read_json_object(run_dir / PROCESS_FILE)
