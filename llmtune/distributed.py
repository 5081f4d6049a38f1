"""Running one recipe on many processes: launch configs, rank-aware helpers and the global batch.

llmtune does not launch processes itself: `accelerate launch` (or torchrun) does, with a config from
accelerate_configs/. This module finds those configs by short name, re-launches `llmtune train` under
accelerate, and gives the task modules the few collective operations they need (main process first,
barriers, a check that data-parallel ranks ended with the same weights).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from llmtune.errors import LlmtuneError, did_you_mean

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "accelerate_configs"
CPU_CONFIGS = ("single", "cpu_ddp")  # every other config needs CUDA GPUs


def _state():
    from accelerate import PartialState

    return PartialState()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    if world_size() > 1:
        _state().wait_for_everyone()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Let the main process load and tokenize first (filling the datasets cache) while the others wait,
    then read the cache - instead of every rank tokenizing at once and the slowest one timing the others out."""
    if world_size() == 1:
        yield
        return
    with _state().main_process_first():
        yield


def ranks_agree(model: torch.nn.Module) -> bool:
    """Whether every data-parallel rank holds the same trainable weights (a float64 checksum per rank)."""
    params = [p.detach().double() for p in model.parameters() if p.requires_grad]
    local = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)])
    from accelerate.utils import gather

    everyone = gather(local.to(_state().device)).view(-1, 2).cpu()
    return bool(torch.allclose(everyone, everyone[0].expand_as(everyone), rtol=1e-9, atol=0))


def accumulation_for(global_batch: int, per_device: int, processes: int) -> int:
    """Gradient accumulation steps that make per_device x accumulation x processes equal the global batch."""
    if global_batch % processes:
        raise LlmtuneError(
            f"'training.global_batch_size' is {global_batch}, which does not divide evenly over {processes} "
            f"processes. Use a multiple of {processes} (e.g. {processes * max(1, round(global_batch / processes))}), "
            "or run on a number of processes that divides it."
        )
    if (global_batch // processes) % per_device:
        raise LlmtuneError(
            f"'training.global_batch_size' is {global_batch}: {global_batch // processes} examples per process, "
            f"which 'training.batch_size' ({per_device}) does not divide. Pick a batch_size that divides "
            f"{global_batch // processes}, or a global batch that is a multiple of {per_device * processes}."
        )
    return global_batch // processes // per_device


def launched_with(mode: str) -> bool:
    """Whether accelerate launched this process in a mode ('FSDP', 'DEEPSPEED'): it exports ACCELERATE_USE_<MODE>."""
    return os.environ.get(f"ACCELERATE_USE_{mode}", "false").lower() in ("1", "true")


def check_launch_environment() -> None:
    """Refuse GPU-only launch modes on a machine without CUDA (accelerate would fail or silently fall back)."""
    if torch.cuda.is_available():
        return
    for mode, what in (("FSDP", "FSDP"), ("DEEPSPEED", "DeepSpeed")):
        if launched_with(mode):
            raise LlmtuneError(
                f"This process was launched with {what}, which needs CUDA GPUs, and this machine has none. "
                "Use --accelerate cpu_ddp (data-parallel processes on CPU) or single."
            )


# --- configs and re-launching --------------------------------------------------------------------------------


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_path(name: str) -> Path:
    """The accelerate config for a short name (or a path to one), checked against this machine."""
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return Path(name)
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        names = available_configs()
        raise LlmtuneError(
            f"--accelerate is {name!r}, which is not one of llmtune's accelerate configs.{did_you_mean(name, names)} "
            f"Available: {', '.join(names)} (files in {CONFIG_DIR}), or the path of your own accelerate config .yaml."
        )
    if name not in CPU_CONFIGS and not torch.cuda.is_available():
        raise LlmtuneError(
            f"--accelerate {name} needs CUDA GPUs, and this machine has none. Use --accelerate cpu_ddp for "
            "data-parallel training on CPU processes, or --accelerate single."
        )
    return path


def relaunch(config: str, train_args: list[str], num_processes: int | None = None) -> int:
    """Run `llmtune train ...` again under `accelerate launch` with the named config; return its exit code."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path(config))]
    if num_processes:
        command += ["--num_processes", str(num_processes)]
    command += ["-m", "llmtune", "train", *train_args]
    logger.info("Launching: %s", " ".join(command))
    return subprocess.call(command)
