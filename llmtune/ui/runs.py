"""The runs the UI shows, read from their folders: state, headline metrics, curves, log tail.

Everything here comes from files a run leaves behind (run.json, process.json, progress.jsonl, metrics.json,
trainer_state.json, checkpoint-N/) plus a live-process check, so it is right after a page reload, after the UI
restarts, and after the training process crashed or was killed. A run launched from the UI also has a job record
(llmtune/ui/jobs.py) that covers the seconds before the training process claims its folder, and its exit code.
"""

from __future__ import annotations

import json
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmtune.errors import LlmtuneError
from llmtune.observe.console import PROGRESS_FILE, is_timing
from llmtune.run.checkpoints import MARKER
from llmtune.run.files import read_json_object
from llmtune.run.process import is_alive, read_process_record
from llmtune.ui import jobs

RUN_NAME = re.compile(r"[\w.-]{1,200}", re.ASCII)
STATES = ("starting", "running", "finished", "stopped", "failed", "resumable")


@dataclass
class RunSummary:
    """One row of the runs table."""

    name: str
    state: str
    task: str = ""
    model: str = ""
    method: str = ""
    precision: str = ""
    started: float | None = None
    duration: float | None = None
    step: int = 0
    max_steps: int = 0
    headline: dict[str, Any] = field(default_factory=dict)  # metric -> {"before": x, "after": y}
    message: str = ""
    exit_code: int | None = None
    can_resume: bool = False
    host: str = ""  # set when another machine trains it (a shared runs folder): nothing to stop or resume here

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_folder(runs_root: Path, name: str) -> Path:
    """The folder of the run called `name` inside the runs root, refusing any name that would leave it."""
    if not RUN_NAME.fullmatch(name) or name.startswith("."):
        raise LlmtuneError(f"'{name[:80]}' is not a run name: a run is one folder directly inside {runs_root}, named "
                           "with letters, digits, '.', '_' and '-' (up to 200).")
    folder = (runs_root / name).resolve()
    if folder.parent != runs_root.resolve():
        raise LlmtuneError(f"'{name}' is not a run inside {runs_root}.")
    return folder


def list_runs(runs_root: Path) -> list[RunSummary]:
    """Every run under the runs root (and every job launched there that has not made its folder yet), newest first."""
    names = {child.name for child in runs_root.iterdir() if child.is_dir() and not child.name.startswith(".")
             and (child / "run.json").is_file()} if runs_root.is_dir() else set()
    names |= set(jobs.job_names(runs_root))
    summaries = [summarize(runs_root, name) for name in names]
    return sorted(summaries, key=lambda s: s.started or 0.0, reverse=True)


def summarize(runs_root: Path, name: str) -> RunSummary:
    folder = run_folder(runs_root, name)
    record = read_json_object(folder / "run.json")
    recipe = record.get("recipe", {})
    summary = RunSummary(name=name, state="starting", task=recipe.get("task", ""),
                         model=(recipe.get("model") or {}).get("name") or "", method=(recipe.get("method") or {}).get("type", ""),
                         precision=(record.get("precision") or {}).get("training", ""))
    job = jobs.read_job(runs_root, name)
    process = read_process_record(folder)
    progress = last_progress(folder)
    summary.step, summary.max_steps = progress.get("step", 0), progress.get("max_steps", 0)
    summary.started = next((t for t in (process.get("first_started"), (job or {}).get("started")) if t is not None),
                           None) or _mtime(folder / "run.json")
    metrics = read_json_object(folder / "metrics.json")
    summary.headline = headline(metrics)
    _apply_state(summary, folder, job, process, metrics)
    summary.duration = training_seconds(process, summary.state)
    return summary


def _apply_state(summary: RunSummary, folder: Path, job: dict | None, process: dict, metrics: dict) -> None:
    """The run's state, newest evidence first: a job launched since the training process last started speaks for
    the run until the new process claims the folder; then the process record (checked against the live process);
    then the files."""
    job = job or {}
    if job and job.get("started", 0.0) > process.get("started", 0.0):
        _job_state(summary, folder, job)
    elif process.get("state") == "running":
        if process.get("host") not in (None, socket.gethostname()):  # no pid of ours to check: trust the record
            summary.state, summary.host = "running", process["host"]
            summary.message = f"Training on {process['host']}: stop or resume it there."
        elif is_alive(process.get("pid"), process.get("process_started")):
            summary.state = "running"
        else:
            summary.state, summary.message = "failed", "The training process ended without a word (killed, or out of memory?)."
    elif process.get("state") in ("finished", "stopped", "failed"):
        summary.state, summary.message = process["state"], process.get("message", "")
        summary.exit_code = process.get("exit_code")
    elif metrics:
        summary.state = "finished"  # a run made before llmtune kept process.json
    else:
        summary.state, summary.message = "failed", "The run left no record of its process and no metrics.json."
    if summary.state in ("stopped", "failed") and not summary.host and any(folder.glob(f"checkpoint-*/{MARKER}")):
        summary.can_resume = True
        if summary.state == "failed":
            summary.state = "resumable"


def _job_state(summary: RunSummary, folder: Path, job: dict[str, Any]) -> None:
    """A job that has not (yet) claimed the run's folder: starting while its process lives, else how it ended."""
    if "exit_code" not in job and is_alive(job.get("pid"), job.get("process_started")):
        summary.state = "starting"
        return
    code = job.get("exit_code")
    summary.state = "stopped" if code in (130, 143) else "failed"
    summary.exit_code = code
    summary.message = jobs.last_error(folder.parent, summary.name) or "The command ended before training started."


def training_seconds(process: dict[str, Any], state: str) -> float | None:
    """Time spent training, over every start of the run (not the pauses between a stop and its resume)."""
    if "seconds" in process and state != "running":
        return process["seconds"]
    if state == "running" and "started" in process:
        return process.get("seconds_before", 0.0) + time.time() - process["started"]
    return None


def headline(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The run's scores before -> after training (what the CLI's end-of-run table prints)."""
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    return {name: {"before": before.get(name), "after": value} for name, value in after.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and not is_timing(name)}


def last_progress(folder: Path) -> dict[str, Any]:
    """The newest line of progress.jsonl (the step the run is at)."""
    for line in reversed(jobs.tail_text(folder / PROGRESS_FILE, 8192).splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {}


def progress_since(folder: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The complete progress.jsonl lines after byte `offset`, and the offset to read from next time."""
    path = folder / PROGRESS_FILE
    if not path.is_file():
        return [], 0
    with path.open("rb") as handle:
        handle.seek(0, 2)
        if offset > handle.tell():  # a new file (the run was started again from scratch): read it from the top
            offset = 0
        handle.seek(offset)
        data = handle.read()
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
    entries = []
    for line in data[:end].decode("utf-8", "replace").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries, offset + end


def history(folder: Path) -> tuple[list[dict[str, Any]], int]:
    """Every training and evaluation log of the run, oldest first, and the progress.jsonl offset they end at:
    progress.jsonl as the run goes (trainer_state.json for a run made before llmtune wrote progress)."""
    entries, offset = progress_since(folder, 0)
    logs = add_logs([], entries)
    if logs or offset:
        return logs, offset
    return list(read_json_object(folder / "trainer_state.json").get("log_history", [])), 0


def add_logs(logs: list[dict[str, Any]], entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The logs with those of new progress entries added. A (re)start at step S drops the logs after S: a run
    resumed from an earlier checkpoint (after kill -9) trains those steps again, and logs them again."""
    for entry in entries:
        if entry.get("event") == "begin":
            logs = [log for log in logs if log["step"] <= entry["step"]]
        elif "log" in entry:
            logs.append({"step": entry["step"], **entry["log"]})
    return logs


SAMPLE_FILES = ("completions.jsonl", "generations.jsonl")  # GRPO's scored completions; SFT / preference generations


def samples(folder: Path, count: int = 8) -> list[dict[str, Any]]:
    """The newest generations the run logged (step, prompt, completion and, for GRPO, the reward)."""
    path = next((folder / name for name in SAMPLE_FILES if (folder / name).is_file()), None)
    if path is None:
        return []
    rows, lines = [], jobs.tail_text(path, 65536).splitlines()
    for line in lines[1:] if path.stat().st_size > 65536 else lines:  # a tail's first line may be cut
        try:
            row = json.loads(line)
        except ValueError:
            continue
        rows.append({key: row.get(key) for key in ("step", "split", "prompt", "completion", "reward") if key in row})
    return rows[-count:]


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None
