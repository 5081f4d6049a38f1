"""Training processes started from the UI: launched detached, so they outlive the page and the UI process.

A launch runs the same command a user would type (`llmtune train RECIPE key=value ... output.dir=RUNS/NAME`) under
a small runner (llmtune/ui/job_runner.py) in a session of its own. Each job leaves, in `RUNS/.llmtune-ui/`:
`NAME.json` (the command, its pid and start time; written by the UI), `NAME.log` (everything the command printed)
and `NAME.exit` (its exit code; written by the runner when the command ends). Stop sends SIGTERM to the job's
process group - llmtune saves a checkpoint and exits 143 - and Resume launches `llmtune train --resume` on the
recipe recorded in the run's run.json.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from llmtune.errors import LlmtuneError
from llmtune.run.files import read_json, read_json_object, write_json, write_text
from llmtune.run.process import is_alive, process_started, read_process_record

JOBS_FOLDER = ".llmtune-ui"


def jobs_folder(runs_root: Path) -> Path:
    return runs_root / JOBS_FOLDER


def job_names(runs_root: Path) -> list[str]:
    folder = jobs_folder(runs_root)
    return sorted(path.stem for path in folder.glob("*.json")) if folder.is_dir() else []


def read_job(runs_root: Path, name: str) -> dict[str, Any] | None:
    folder = jobs_folder(runs_root)
    job = read_json_object(folder / f"{name}.json")
    return job | read_json_object(folder / f"{name}.exit") if job else None


def log_path(runs_root: Path, name: str) -> Path:
    return jobs_folder(runs_root) / f"{name}.log"


def tail_text(path: Path, size: int) -> str:
    """The last `size` bytes of a file as text ('' when there is no file)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - size))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def log_tail(runs_root: Path, name: str, size: int = 6000) -> str:
    """The end of what the job printed (the progress lines, an error paragraph)."""
    return tail_text(log_path(runs_root, name), size)


def last_error(runs_root: Path, name: str) -> str:
    """llmtune's one-paragraph error from the job's log ('error: ...'), or the log's last line."""
    lines = [line for line in log_tail(runs_root, name, 20000).splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    return lines[-1] if lines else ""


def train_command(recipe: str, overrides: list[str], run_dir: Path, resume: bool = False,
                  accelerate: str | None = None) -> list[str]:
    """`llmtune train ...` as a user would type it, with the run's folder made explicit."""
    command = ["llmtune", "train", recipe, *overrides, f"output.dir={run_dir}"]
    if resume:
        command.append("--resume")
    if accelerate:
        command += ["--accelerate", accelerate]
    return command


def accelerate_configs() -> list[str]:
    """The short names `llmtune train --accelerate` takes (llmtune/accelerate_configs/*.yaml)."""
    from importlib.resources import files

    return sorted(p.name.removesuffix(".yaml") for p in files("llmtune").joinpath("accelerate_configs").iterdir()
                  if p.name.endswith(".yaml"))


def check_accelerate(name: str | None) -> None:
    if name and name not in accelerate_configs():
        raise LlmtuneError(f"accelerate is '{name}'; from the UI it is one of llmtune's configs: "
                           f"{', '.join(accelerate_configs())} (a config file of your own: use the command line).")


def launch(runs_root: Path, name: str, command: list[str], recipe: str, overrides: list[str],
           accelerate: str | None = None) -> dict[str, Any]:
    """Start `command` (an `llmtune ...` argv) detached; returns the job record."""
    folder = jobs_folder(runs_root)
    folder.mkdir(parents=True, exist_ok=True)
    exit_file = folder / f"{name}.exit"
    exit_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "llmtune", *command[1:]]
    with log_path(runs_root, name).open("a") as log:
        log.write(f"\n$ {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            [sys.executable, "-m", "llmtune.ui.job_runner", str(exit_file), "--", *argv],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    threading.Thread(target=process.wait, daemon=True).start()  # reaps it when it ends: no zombie stays behind
    job = {"name": name, "pid": process.pid, "process_started": process_started(process.pid), "started": time.time(),
           "command": shlex.join(command), "recipe": recipe, "overrides": overrides, "accelerate": accelerate}
    write_json(folder / f"{name}.json", job)
    return job


def resume_recipe(runs_root: Path, run_dir: Path) -> str:
    """The run's own recipe (from its run.json) as a YAML file to resume from."""
    try:
        recipe = read_json(run_dir / "run.json")["recipe"]
    except (OSError, ValueError, KeyError):
        raise LlmtuneError(f"'{run_dir}' has no readable run.json with its recipe, so it cannot be resumed.") from None
    path = jobs_folder(runs_root) / f"{run_dir.name}.resume.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def stop(runs_root: Path, name: str, run_dir: Path, force: bool = False) -> str:
    """SIGTERM to the run's training: llmtune saves a checkpoint and exits 143 (`force`: SIGKILL, for a training
    that does not answer SIGTERM - its newest complete checkpoint stays). Returns what was signalled."""
    sig = signal.SIGKILL if force else signal.SIGTERM
    job = read_job(runs_root, name)
    try:
        if job and "exit_code" not in job and is_alive(job.get("pid"), job.get("process_started")):
            os.killpg(job["pid"], sig)  # the runner ignores SIGTERM; the training process (and its ranks) stop
            return f"process group {job['pid']}"
        process = read_process_record(run_dir)
        if process.get("state") == "running" and is_alive(process.get("pid"), process.get("process_started")):
            os.kill(process["pid"], sig)
            return f"process {process['pid']}"
    except ProcessLookupError:
        pass  # it ended between the check and the signal
    except PermissionError:
        raise LlmtuneError(f"The run '{name}' is trained by another user's process; this UI may not stop it.") from None
    raise LlmtuneError(f"The run '{name}' is not running; there is nothing to stop.")
