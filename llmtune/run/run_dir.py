"""The run directory: naming it, refusing to overwrite one by accident, claiming it, and recording what made it.

A run directory holds `run.json` (resolved recipe, overrides, precision, library versions, data fingerprints, and
one entry per resume), `metrics.json`, the saved model or adapter, `checkpoint-N/` folders and, for tasks that
predict, `predictions.jsonl`. Files are written atomically (llmtune/run/files.py).
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from llmtune.config.vocab import RESUME_SAFE_KEYS
from llmtune.errors import LlmtuneError
from llmtune.run.files import read_json, why_unwritable, write_json

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"
METRICS_FILE = "metrics.json"
TRACKED_PACKAGES = (
    "llmtune", "torch", "transformers", "datasets", "peft", "accelerate", "evaluate", "tokenizers",
    "safetensors", "huggingface_hub", "bitsandbytes", "trl",
)


def run_dir_for(template: str, task: str, model: str, resume: bool) -> Path:
    """Fill {task}, {model} and {time} in output.dir."""
    if resume and "{time}" in template:
        raise LlmtuneError(
            f"--resume needs the directory of the run to continue, but output.dir is '{template}', which names a "
            "new folder each time. Add output.dir=<that run's folder>, e.g. output.dir=runs/quickstart-20260101-120000."
        )
    try:
        return Path(template.format(task=task, model=model, time=time.strftime("%Y%m%d-%H%M%S")))
    except (KeyError, IndexError, ValueError):
        raise LlmtuneError(
            f"'output.dir' is '{template}'; the only placeholders it may hold are {{task}}, {{model}} and {{time}}."
        ) from None


def check_new_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to start a new run where a run (or anything) already is, unless overwriting was asked for."""
    if run_dir.exists() and not run_dir.is_dir():
        raise LlmtuneError(f"'output.dir' is '{run_dir}', which is a file. Choose a folder path for the run.")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        holds_run = (run_dir / RUN_RECORD).exists() or any(run_dir.glob("checkpoint-*"))
        raise LlmtuneError(
            f"Output directory '{run_dir}' already holds {'a previous run' if holds_run else 'files'}; llmtune will "
            "not touch it. Continue it with --resume, set output.overwrite=true to replace it, or choose another "
            "output.dir."
        )


def check_writable(run_dir: Path) -> None:
    """Fail now, not after loading a model, when the run directory cannot be created or written."""
    problem = why_unwritable(run_dir)
    if problem:
        raise LlmtuneError(
            f"'output.dir' is '{run_dir}', but {problem}. Choose an output.dir in a folder you can write to, "
            "e.g. output.dir=runs/my-run."
        )


def claim_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """Create the run directory; with overwrite, clear the old run (done late, once loading has succeeded)."""
    if overwrite and not resume and run_dir.exists():
        logger.warning("output.overwrite=true: replacing the previous contents of %s", run_dir)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def read_run_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_RECORD
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        raise LlmtuneError(f"'{path}' cannot be read ({exc}); it is not a complete llmtune run record.") from None


def write_run_record(run_dir: Path, record: dict[str, Any]) -> None:
    write_json(run_dir / RUN_RECORD, {**record, "versions": library_versions()})


def changed_settings(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Recipe keys whose values differ between two recipe dicts ('training.learning_rate': (old, new)),
    leaving out the keys that do not change what is trained (RESUME_SAFE_KEYS) and keys the earlier recipe does
    not have (added to llmtune after that run started: it ran with their default)."""
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(before):
        where = f"{prefix}{key}"
        old, new = before[key], after.get(key)
        if isinstance(old, dict) and isinstance(new, dict) and not prefix:
            changes |= changed_settings(old, new, f"{where}.")
        elif old != new and where not in RESUME_SAFE_KEYS:
            changes[where] = (old, new)
    return changes


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": _cpu_name()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

