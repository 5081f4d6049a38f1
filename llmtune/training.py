"""The recipe's `training` section as transformers TrainingArguments, plus graceful Ctrl-C.

Only this module spells transformers' argument names, so their renames stop here.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from llmtune.config.schema import TrainingConfig
from llmtune.distributed import accumulation_for, check_launch_environment, ranks_agree, world_size
from llmtune.errors import LlmtuneError
from llmtune.runs import last_checkpoint

logger = logging.getLogger(__name__)

# llmtune's optimizer names -> transformers' (any other name transformers knows is passed through as is).
OPTIMIZERS = {
    "adamw": "adamw_torch_fused",  # one fused kernel per step: 3.5x faster than foreach on CPU (5M LoRA weights)
    "adamw_foreach": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "lion_8bit": "lion_8bit",
    "paged_lion_8bit": "paged_lion_8bit",
    "adafactor": "adafactor",
    "sgd": "sgd",
    "rmsprop": "rmsprop",
}

UNPAGED = {"paged_adamw_8bit": "adamw_bnb_8bit", "paged_adamw_32bit": "adamw_torch"}


def transformers_optimizer(name: str) -> str:
    """The transformers name of a recipe's optimizer; paged variants only page on CUDA."""
    optim = OPTIMIZERS.get(name, name)
    if optim.startswith("paged_") and not torch.cuda.is_available():
        unpaged = UNPAGED.get(optim, optim.removeprefix("paged_"))
        logger.info("Optimizer %s pages its state only on CUDA; running %s here.", name, unpaged)
        return unpaged
    return optim


def training_arguments(
    cfg: TrainingConfig,
    output_dir: str,
    main_metric: str,
    has_eval: bool,
    args_class: type[TrainingArguments] = TrainingArguments,
    padded: bool = True,
    **task_arguments,
) -> TrainingArguments:
    """TrainingArguments (or a subclass such as trl's SFTConfig, with its task_arguments) for this recipe.

    `main_metric` picks the best checkpoint unless the recipe names one; `padded` says whether batches are
    padded (length grouping only helps those).
    """
    check_launch_environment()
    processes = world_size()
    accumulation = cfg.gradient_accumulation
    if cfg.global_batch_size:
        accumulation = accumulation_for(cfg.global_batch_size, cfg.batch_size, processes)
    logger.info("Global batch: %d per device x %d accumulation x %d processes = %d examples per optimizer step",
                cfg.batch_size, accumulation, processes, cfg.batch_size * accumulation * processes)
    precision = resolved_precision(cfg.precision)
    logger.info("Training precision: %s%s", precision, " (auto)" if cfg.precision == "auto" else "")
    eval_strategy, eval_steps = ("no", None) if not has_eval else _cadence(cfg.eval_every)
    if cfg.save_every == "eval":
        save_strategy, save_steps = (eval_strategy, eval_steps) if eval_strategy != "no" else ("epoch", None)
    else:
        save_strategy, save_steps = _cadence(cfg.save_every)
    metric = cfg.metric_for_best or main_metric
    keep_best = eval_strategy != "no" and (save_strategy, save_steps) == (eval_strategy, eval_steps)
    return args_class(
        output_dir=output_dir,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup,  # a float below 1 is a ratio of total steps
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
        gradient_accumulation_steps=accumulation,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=transformers_optimizer(cfg.optimizer),
        gradient_checkpointing=cfg.gradient_checkpointing,
        torch_compile=cfg.compile,
        use_liger_kernel=liger_kernels_on(cfg.liger_kernels),
        seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        eval_strategy=eval_strategy,
        eval_steps=eval_steps,
        save_strategy=save_strategy,
        save_steps=save_steps,
        logging_steps=cfg.log_every,
        save_total_limit=cfg.keep_checkpoints,
        load_best_model_at_end=keep_best,
        metric_for_best_model=metric if has_eval else None,
        greater_is_better=metric != "loss",
        dataloader_num_workers=cfg.dataloader_workers,
        train_sampling_strategy="group_by_length" if cfg.group_by_length and padded else "random",
        report_to="none",
        ddp_find_unused_parameters=False,  # frozen base weights are not "unused"; searching for them costs a pass
        **task_arguments,
    )


def _cadence(value: int | str) -> tuple[str, int | None]:
    if isinstance(value, int):
        return "steps", value
    return value, None


def liger_kernels_on(setting: str) -> bool:
    """Whether to train with Liger's kernels: they are Triton (CUDA) kernels from the liger-kernel package."""
    if setting == "off":
        return False
    on_gpu = torch.cuda.is_available()
    installed = importlib.util.find_spec("liger_kernel") is not None
    if setting == "on" and not (on_gpu and installed):
        missing = "a CUDA GPU" if not on_gpu else "the liger-kernel package (pip install liger-kernel)"
        raise LlmtuneError(
            f"'training.liger_kernels' is 'on', but this machine lacks {missing}. Use 'auto' (Liger where it "
            "can run) or 'off'."
        )
    return on_gpu and installed


def resolved_precision(precision: str) -> str:
    """fp32, bf16 or fp16. auto: bf16 on GPUs that support it and on CPUs with native bf16 matmuls
    (avx512_bf16 or AMX), where it runs several times faster than fp32; fp32 elsewhere - on other CPUs bf16 is
    emulated and slower than fp32."""
    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        fast_bf16 = torch.cuda.is_bf16_supported() if on_gpu else cpu_has_native_bf16()
        return "bf16" if fast_bf16 else "fp32"
    if precision == "fp16" and not on_gpu:
        raise LlmtuneError(
            "'training.precision' is 'fp16', but there is no GPU: fp16 on a CPU runs at a tiny fraction of fp32 "
            "speed. Use training.precision=bf16 (CPUs with avx512_bf16 or AMX) or fp32."
        )
    return precision


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bf16 in hardware (Linux: the avx512_bf16 or amx_bf16 flag)."""
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


class GracefulInterrupt(TrainerCallback):
    """First Ctrl-C: finish the current step, save a resumable checkpoint, stop. Second Ctrl-C: abort now."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Interrupted: saving a checkpoint after this step (press Ctrl-C again to abort now).")

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control


class FirstEvaluation(TrainerCallback):
    """Keeps the metrics of the evaluation that runs before the first training step."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.metrics is None and state.global_step == 0:
            self.metrics = dict(metrics or {})


def train_and_evaluate(
    trainer: Any,
    run_dir: Path,
    resume: bool,
    evaluate_before: bool,
    summarize: Callable[[dict[str, float], str], dict[str, Any]],
) -> dict[str, Any]:
    """Evaluate before (optional), train (resuming if asked, Ctrl-C-safe), evaluate after.

    `summarize(raw_metrics, prefix)` turns the Trainer's prefixed metrics into the task's own names.
    Raises KeyboardInterrupt, after a checkpoint is saved, when the user pressed Ctrl-C.
    """
    metrics: dict[str, Any] = {}
    has_eval = trainer.eval_dataset is not None
    first_evaluation = FirstEvaluation()
    if has_eval and evaluate_before and not resume:
        # Evaluated inside train(), after the model is wrapped for distributed training: calling
        # trainer.evaluate() first registers the bare model with accelerate, and train() then skips the DDP
        # wrapper - every process silently trains alone (transformers 5.23 / accelerate 1.15).
        trainer.args.eval_on_start = True
        trainer.add_callback(first_evaluation)
    checkpoint = last_checkpoint(run_dir) if resume else None
    with GracefulInterrupt() as interrupt:
        trainer.add_callback(interrupt)
        result = trainer.train(resume_from_checkpoint=checkpoint)
    if first_evaluation.metrics is not None:
        metrics["before"] = summarize(first_evaluation.metrics, "eval_")
    if interrupt.requested:
        raise KeyboardInterrupt(
            f"Training interrupted; a checkpoint is in {last_checkpoint(run_dir)}. "
            "Continue with the same command plus --resume."
        )
    metrics["train"] = {**result.metrics, "global_step": trainer.state.global_step}
    if trainer.args.world_size > 1 and not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        # Data-parallel ranks must end identical; a rank that silently trained alone would not.
        metrics["train"]["ranks_in_sync"] = ranks_agree(trainer.model)
        if not metrics["train"]["ranks_in_sync"]:
            logger.error("The %d processes ended with different weights: they did not train together.",
                         trainer.args.world_size)
    if has_eval:
        metrics["after"] = summarize(trainer.evaluate(metric_key_prefix="after"), "after_")
    return metrics
