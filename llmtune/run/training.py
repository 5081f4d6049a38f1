"""The recipe's `training` section as transformers TrainingArguments, and the train -> evaluate step every task
runs (checkpoints that count only when complete, Ctrl-C / SIGTERM, the whole-run training loss).

Only this module spells transformers' argument names, so their renames stop here.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import EarlyStoppingCallback, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback

from llmtune.config.schema import Recipe, TrainingConfig
from llmtune.config.vocab import OPTIMIZERS
from llmtune.errors import LlmtuneError, TrainingStopped
from llmtune.patches.interruptible_evaluation import EvaluationInterrupted
from llmtune.patches.length_grouped_order import SeededLengthGroupedOrder
from llmtune.run.callbacks import ReleaseFreedMemory, StopOnSignal, TrainingSanity
from llmtune.run.checkpoints import CompleteCheckpoints, newest_complete, save_failure
from llmtune.run.distributed import accumulation_for, check_launch_environment, ranks_agree, world_size
from llmtune.run.precision import resolved_precision

logger = logging.getLogger(__name__)

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
    recipe: Recipe,
    output_dir: str,
    main_metric: str,
    eval_set: bool,
    resume: bool = False,
    args_class: type[TrainingArguments] = TrainingArguments,
    padded: bool = True,
    metric_keys: dict[str, str] | None = None,
    **task_arguments,
) -> TrainingArguments:
    """TrainingArguments (or a subclass such as trl's SFTConfig, with its task_arguments) for this recipe.

    `main_metric` picks the best checkpoint unless the recipe names one; `eval_set` says whether there is evaluation
    data; `padded` whether batches are padded (length grouping only helps those). With an eval set, a new run
    evaluates once before the first step (eval.before_training) - also with eval_every=no, which only turns off
    evaluations during training; a resumed run already did. `metric_keys` maps llmtune's metric names to the ones
    the Trainer logs, where they differ (trl's 'rewards/accuracies' for 'accuracy'); `task_arguments` are added
    to, or replace, the arguments built here, and the recipe's `training.trainer_args` come last of all.
    """
    arguments = recipe_arguments(recipe, output_dir, main_metric, eval_set, resume, padded, metric_keys)
    extra = recipe.training.trainer_args
    if extra:
        logger.info("training.trainer_args: %s", ", ".join(f"{key}={value!r}" for key, value in extra.items()))
    try:
        return args_class(**{**arguments, **task_arguments, **extra})
    except (TypeError, ValueError) as exc:
        if not extra:
            raise
        # The names were checked with the recipe; the values only transformers can judge.
        raise LlmtuneError(
            f"transformers refused the training arguments with 'training.trainer_args' {extra}: {exc}. Fix the "
            "values in training.trainer_args (or drop them)."
        ) from exc


def recipe_arguments(
    recipe: Recipe,
    output_dir: str,
    main_metric: str,
    eval_set: bool,
    resume: bool = False,
    padded: bool = True,
    metric_keys: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The TrainingArguments llmtune sets from the recipe (their names are config.trainer_args.MAPPED, which
    training.trainer_args may not set)."""
    cfg = recipe.training
    has_eval = eval_set and cfg.eval_every != "no"
    evaluate_first = eval_set and recipe.eval.before_training and not resume
    check_launch_environment()
    accumulation = _accumulation(cfg)
    precision = resolved_precision(cfg.precision)
    logger.info("Training precision: %s%s", precision, " (auto)" if cfg.precision == "auto" else "")
    eval_strategy, eval_steps, save_strategy, save_steps = _checkpoint_cadence(cfg, has_eval)
    metric = cfg.metric_for_best or main_metric
    metric = (metric_keys or {}).get(metric, metric)
    keep_best = eval_strategy != "no" and (save_strategy, save_steps) == (eval_strategy, eval_steps)
    return dict(
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
        activation_checkpointing=cfg.gradient_checkpointing,
        torch_compile=cfg.compile,
        use_liger_kernel=liger_kernels_on(cfg.liger_kernels),
        seed=cfg.seed,
        full_determinism=cfg.deterministic,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        eval_strategy=eval_strategy,
        eval_steps=eval_steps,
        # Evaluated inside train(), after the model is wrapped for distributed training: calling evaluate() first
        # registers the bare model with accelerate, and train() then skips the DDP wrapper - every process
        # silently trains alone (transformers 5.23 / accelerate 1.15).
        eval_on_start=evaluate_first,
        save_strategy=save_strategy,
        save_steps=save_steps,
        logging_steps=cfg.log_every,
        save_total_limit=None,  # llmtune rotates checkpoints itself, only once a newer one is complete
        load_best_model_at_end=keep_best,
        metric_for_best_model=metric if has_eval else None,
        greater_is_better=not metric.endswith("loss"),
        dataloader_num_workers=cfg.dataloader_workers,
        train_sampling_strategy="group_by_length" if cfg.group_by_length and padded else "random",
        report_to=cfg.report_to or "none",
        ddp_find_unused_parameters=False,  # frozen base weights are not "unused"; searching for them costs a pass
    )


def _accumulation(cfg: TrainingConfig) -> int:
    """Gradient accumulation steps: the recipe's, or what training.global_batch_size needs on these processes."""
    processes = world_size()
    accumulation = cfg.gradient_accumulation
    if cfg.global_batch_size:
        accumulation = accumulation_for(cfg.global_batch_size, cfg.batch_size, processes)
    logger.info("Global batch: %d per device x %d accumulation x %d processes = %d examples per optimizer step",
                cfg.batch_size, accumulation, processes, cfg.batch_size * accumulation * processes)
    return accumulation


def _checkpoint_cadence(cfg: TrainingConfig, has_eval: bool) -> tuple[str, int | None, str, int | None]:
    """(eval_strategy, eval_steps, save_strategy, save_steps); save_every=eval saves with each evaluation."""
    eval_strategy, eval_steps = ("no", None) if not has_eval else _cadence(cfg.eval_every)
    if cfg.save_every == "eval":
        save_strategy, save_steps = (eval_strategy, eval_steps) if eval_strategy != "no" else ("epoch", None)
    else:
        save_strategy, save_steps = _cadence(cfg.save_every)
    return eval_strategy, eval_steps, save_strategy, save_steps


def _cadence(value: int | str) -> tuple[str, int | None]:
    if isinstance(value, int):
        return "steps", value
    return value, None


def early_stopping(cfg: TrainingConfig) -> list[TrainerCallback]:
    """The early-stopping callback when the recipe asks for one (patience in evaluations)."""
    return [EarlyStoppingCallback(cfg.early_stopping_patience)] if cfg.early_stopping_patience else []


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


def attach_run_callbacks(trainer: Any, cfg: TrainingConfig, run_dir: Path) -> None:
    """What every llmtune Trainer carries, also when a Python user drives it: complete-only checkpoints with
    rotation (last, so it sees every other callback's decision), the seeded length-grouped order, the sanity
    checks, and (`training.release_memory`) freed memory handed back to the OS on a CPU."""
    extra = [ReleaseFreedMemory()] if cfg.release_memory else []
    for callback in (SeededLengthGroupedOrder(cfg.seed), TrainingSanity(cfg.learning_rate), *extra,
                     CompleteCheckpoints(run_dir, cfg.keep_checkpoints)):
        trainer.add_callback(callback)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):  # a fixed folder in the run, not runs/<time>_<host>
            callback.logging_dir = str(run_dir / "tensorboard")


def _callback(trainer: Any, kind: type) -> Any:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, kind))


def train_and_evaluate(
    trainer: Any,
    cfg: TrainingConfig,
    run_dir: Path,
    resume_from: Path | None,
    summarize: Callable[[dict[str, float], str], dict[str, Any]],
) -> dict[str, Any]:
    """Train (from `resume_from` if given) with complete-only checkpoints and signal handling, then evaluate.

    Returns {'before': ..., 'train': ..., 'after': ...}; `summarize(raw_metrics, prefix)` turns the Trainer's
    prefixed metrics into the task's own names. Raises TrainingStopped after a signal (a checkpoint is saved),
    and LlmtuneError when a checkpoint could not be written.
    """
    sanity = _callback(trainer, TrainingSanity)
    result = _train_or_stop(trainer, cfg, run_dir, resume_from)
    history = trainer.state.log_history
    metrics: dict[str, Any] = {}
    before = next((h for h in history if h.get("step") == 0 and any(k.startswith("eval_") for k in h)), None)
    if before is not None:  # evaluated at step 0 - kept in the checkpoints' state, so a resumed run has it too
        metrics["before"] = summarize(before, "eval_")
    metrics["train"] = {
        **result.metrics,
        "train_loss": whole_run_loss(history, result.metrics.get("train_loss")),
        "global_step": trainer.state.global_step,
        **sanity.report(),
    }
    if trainer.args.world_size > 1 and not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        # Data-parallel ranks must end identical; a rank that silently trained alone would not.
        metrics["train"]["ranks_in_sync"] = ranks_agree(trainer.model)
        if not metrics["train"]["ranks_in_sync"]:
            logger.error("The %d processes ended with different weights: they did not train together.",
                         trainer.args.world_size)
    if trainer.eval_dataset is not None:
        # Early stopping judges evaluations during training; given the final one (keys 'after_*') it only warns.
        trainer.remove_callback(EarlyStoppingCallback)
        metrics["after"] = summarize(trainer.evaluate(metric_key_prefix="after"), "after_")
    return metrics


def _train_or_stop(trainer: Any, cfg: TrainingConfig, run_dir: Path, resume_from: Path | None) -> Any:
    """trainer.train() under StopOnSignal: the TrainOutput, or TrainingStopped once a signal's checkpoint is saved."""
    checkpoints = _callback(trainer, CompleteCheckpoints)
    stop = StopOnSignal(cfg.stop_grace_seconds, trainer)
    trainer.add_callback(stop)
    try:
        with stop:
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except EvaluationInterrupted:  # only the evaluation before the first step ends this way: nothing to save
        raise TrainingStopped(
            "Training stopped during the evaluation before its first step; nothing was trained, so no checkpoint "
            "was saved. Start again with the same command plus output.overwrite=true.", stop.exit_code,
        ) from None
    except (OSError, RuntimeError, SafetensorError) as exc:
        # A stop's save is decided after CompleteCheckpoints has looked at the step, so it is not its saving_step.
        step = checkpoints.saving_step if checkpoints.saving_step is not None else \
            (trainer.state.global_step if stop.requested else None)
        if step is not None and (run_dir / f"checkpoint-{step}").exists():
            raise save_failure(exc, run_dir, step) from exc
        raise
    finally:
        trainer.remove_callback(stop)
    if stop.requested:
        newest, _ = newest_complete(run_dir)
        raise TrainingStopped(
            f"Training stopped at step {trainer.state.global_step}; the checkpoint is {newest}. "
            "Continue with the same command plus --resume.", stop.exit_code,
        )
    return result


def whole_run_loss(history: list[dict[str, Any]], fallback: float | None) -> float | None:
    """Mean training loss over every step of the run, resumed parts included: each logged loss is the mean over
    the steps since the previous log, so weight it by those steps. (The Trainer's own train_loss covers only
    the steps of the last train() call.) The loss is logged at every checkpoint and at the end, so the logs
    cover the whole run."""
    total = steps = 0.0
    last = 0
    for entry in history:
        if "loss" in entry and "step" in entry and entry["step"] > last:
            total += entry["loss"] * (entry["step"] - last)
            steps += entry["step"] - last
            last = entry["step"]
    return total / steps if steps else fallback
