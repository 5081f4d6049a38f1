"""The run directory: claiming it safely, recording what produced it, finding its checkpoints.

A run directory holds `run.json` (resolved recipe, library versions, data fingerprints), `metrics.json`,
the saved model or adapter, `checkpoint-N/` folders and, for tasks that predict, `predictions.jsonl`.
Every file is written to a temporary name and renamed, so a crash leaves the previous version intact.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers.trainer_utils import get_last_checkpoint

from llmtune.distributed import barrier
from llmtune.errors import LlmtuneError

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


def check_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to start where a run already is, unless overwriting or resuming was asked for."""
    if resume:
        if last_checkpoint(run_dir) is None:
            raise LlmtuneError(
                f"--resume was given, but '{run_dir}' holds no checkpoint-N folder to resume from. "
                "Start the run without --resume, or point output.dir at the interrupted run."
            )
        return
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        what = "a previous run" if (run_dir / RUN_RECORD).exists() or last_checkpoint(run_dir) else "files"
        raise LlmtuneError(
            f"Output directory '{run_dir}' already holds {what}; llmtune will not touch it. Continue it with "
            "--resume, set output.overwrite=true to replace it, or choose another output.dir."
        )
    barrier()  # every process has looked before the main one claims the directory


def claim_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """Create the run directory; with overwrite, clear the old run (done late, once loading has succeeded)."""
    if overwrite and not resume and run_dir.exists():
        logger.warning("output.overwrite=true: replacing the previous contents of %s", run_dir)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def start_run(
    run_dir: Path, recipe: Any, overrides: list[str] | None, resume: bool, trainer: Any, **task_record: Any
) -> None:
    """Claim the run directory and write run.json (main process only): resolved recipe, overrides, world size,
    global batch, parameter counts, library versions and task facts."""
    if trainer.is_world_process_zero():
        _write_run_record(run_dir, recipe, overrides, resume, trainer, task_record)
    barrier()  # nobody trains into the directory before it is claimed


def _write_run_record(run_dir: Path, recipe: Any, overrides: list[str] | None, resume: bool, trainer: Any,
                      task_record: dict) -> None:
    from llmtune.config.loader import recipe_to_dict
    from llmtune.data.loading import fingerprint_sources
    from llmtune.models.adapters import parameter_summary

    claim_run_dir(run_dir, recipe.output.overwrite, resume)
    args = trainer.args
    write_json(run_dir / RUN_RECORD, {
        "recipe": recipe_to_dict(recipe),
        "overrides": overrides or [],
        "data": fingerprint_sources(recipe.data),
        "world_size": args.world_size,
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "parameters": parameter_summary(trainer.model),
        **task_record,
        "versions": library_versions(),
    })


def last_checkpoint(run_dir: Path) -> str | None:
    return get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: the old file stays whole until the new one is complete."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
