"""Running one recipe on many processes: launch configs, rank-aware helpers and the global batch.

llmtune does not launch processes itself: `accelerate launch` (or torchrun) does, with a config from
`llmtune/accelerate_configs/` (also reachable as `accelerate_configs/` at the top of a checkout). This module finds
those configs by short name, re-launches `llmtune train` under accelerate, and gives the rest of llmtune the few
collective operations it needs (main process first, barriers, agreement between ranks). torch and accelerate
are imported only by the helpers that talk to other processes, so the command line stays quick.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from llmtune.errors import LlmtuneError, did_you_mean

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "accelerate_configs"  # inside the package: wheels carry them
CPU_CONFIGS = ("single", "cpu_ddp")  # every other config needs CUDA GPUs


def _state():
    """accelerate's process state. Without CUDA it must be asked for CPU processes: a plain PartialState() under
    torchrun then reports one process (DistributedType.NO) on every rank, and its barriers and main-process-first
    blocks silently do nothing - until TrainingArguments(use_cpu=True) sets it up properly, after loading."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    if world_size() > 1:
        _state().wait_for_everyone()


@contextlib.contextmanager
def main_process_first(local: bool = False) -> Iterator[None]:
    """Let the main process load, convert and tokenize first (filling the caches) while the others wait,
    then read the caches - instead of every rank converting or tokenizing at once. `local`: the main process of
    each machine, for caches that live on each machine's own disk."""
    if world_size() == 1:
        yield
        return
    state = _state()
    with state.local_main_process_first() if local else state.main_process_first():
        yield


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on at least one process (every process must call this at the same point)."""
    if world_size() == 1:
        return flag
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)], device=_state().device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def ranks_agree(model: torch.nn.Module) -> bool:
    """Whether every data-parallel rank holds the same trainable weights (a float64 checksum per rank)."""
    import torch
    from accelerate.utils import gather

    params = [p.detach().double() for p in model.parameters() if p.requires_grad]
    local = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)])
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


def shut_down() -> None:
    """Leave the process group at the end of a run, on every rank. Left to interpreter exit, the group's
    communication threads can be destroyed while still joinable, and a rank that finished its work aborts
    ("terminate called without an active exception") - a failed exit code for a run that succeeded. A
    one-process FSDP launch has a group too (on an H200 such a run logged its last line and was still not done
    at its check's time cap)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launched_with(mode: str) -> bool:
    """Whether accelerate launched this process in a mode ('FSDP', 'DEEPSPEED'): it exports ACCELERATE_USE_<MODE>."""
    return os.environ.get(f"ACCELERATE_USE_{mode}", "false").lower() in ("1", "true")


def check_launch_environment() -> None:
    """Refuse GPU-only launch modes on a machine without CUDA (accelerate would fail or silently fall back)."""
    import torch

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
    import torch

    if name not in CPU_CONFIGS and not torch.cuda.is_available():
        raise LlmtuneError(
            f"--accelerate {name} needs CUDA GPUs, and this machine has none. Use --accelerate cpu_ddp for "
            "data-parallel training on CPU processes, or --accelerate single."
        )
    return path


# After forwarding a signal, torchrun's agent SIGKILLs workers that are still running after this many seconds
# (its default is 30): long enough for the step and checkpoint that a SIGTERM asks for.
SHUTDOWN_SECONDS = 600


def relaunch(config: str, train_args: list[str], num_processes: int | None = None,
             grace_seconds: int | None = None) -> int:
    """Run `llmtune train ...` again under `accelerate launch` with the named config; return its exit code.

    SIGTERM and Ctrl-C sent to this process go to the launcher, whose agent passes them on to the training
    processes and gives them `grace_seconds` (default 600) to save a checkpoint before killing them. This process
    then exits 128 + the signal (130, 143) if they stopped on it, else with their code.
    """
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path(config))]
    if num_processes:
        command += ["--num_processes", str(num_processes)]
    command += ["-m", "llmtune", "train", *train_args]
    logger.info("Launching: %s", " ".join(command))
    env = {**os.environ}
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(grace_seconds + 30 if grace_seconds else SHUTDOWN_SECONDS))
    child = subprocess.Popen(command, env=env)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        if signum == signal.SIGTERM:  # Ctrl-C reaches the launcher from the terminal already (same process group)
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received and code != 0:
        return 128 + received[0]  # the launcher itself reports a forwarded signal as a failure (exit 1)
    return 128 - code if code < 0 else code  # a child killed by signal N reports -N; shells say 128 + N
