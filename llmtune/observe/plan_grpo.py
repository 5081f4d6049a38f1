"""`llmtune plan` for task grpo: a GRPO step is mostly sampling, so its cost is measured on real steps - each one
samples the step's completions, scores them and trains on them - not priced from training passes alone.

Memory: the breakdown of observe/plan.py for the longest row a step can hold (the longest prompt plus
rl.max_completion_length), then the peak over two real steps. Time: the second step's seconds (the first pays the
warm-up) for every optimizer step, plus evaluation and the held-out prompts before and after, priced at the
measured seconds per sampled completion (generation dominates both; the estimate is an upper bound, since
evaluation trains nothing). The two steps run in the plan's scratch folder and touch no run.
"""

from __future__ import annotations

import math
import time
from typing import Any

from transformers import TrainerCallback

from llmtune.config.schema import Recipe
from llmtune.observe.plan import Plan, _peak_bytes, advice, breakdown

DRY_STEPS = 2


class _StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())


def make_grpo_plan(trainer: Any, recipe: Recipe, device_memory: float | None = None, dry_run: bool = True) -> Plan:
    """Memory and time of a GRPO recipe with its built trainer (two real steps when `dry_run`)."""
    args, rl = trainer.args, recipe.rl
    longest = recipe.data.max_length  # prompts were fitted to leave room for a completion
    completions_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    prompts_per_epoch = len(trainer.train_dataset)
    per_epoch = max(1, prompts_per_epoch * rl.num_generations // completions_per_step)
    steps = args.max_steps if args.max_steps > 0 else math.ceil(per_epoch * args.num_train_epochs)
    eval_prompts = len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0
    evaluations = _grpo_evaluations(args, steps)
    memory = breakdown(trainer.model, recipe, args.per_device_train_batch_size, longest,
                       args.per_device_eval_batch_size, eval_length=longest)
    estimate = sum(v for k, v in memory.items() if k not in ("activations with checkpointing", "training logits"))
    plan = Plan(
        parameters={"total": sum(p.numel() for p in trainer.model.parameters()),
                    "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)},
        memory=memory, estimate_bytes=estimate,
        tokens={"prompts": prompts_per_epoch, "longest": longest},
        steps={"optimizer_steps": steps, "micro_batches_per_step": args.gradient_accumulation_steps,
               "evaluations": evaluations, "completions_per_step": completions_per_step,
               "held_out_prompts": eval_prompts},
        device="cuda" if next(trainer.model.parameters()).is_cuda else "cpu", device_memory=device_memory,
    )
    if dry_run and (device_memory is None or estimate <= device_memory):
        step_seconds = time_grpo_steps(trainer)
        per_completion = step_seconds / completions_per_step
        sampled = eval_prompts * rl.num_generations
        held_out = 2 * (sampled + eval_prompts)  # before and after: sampled and greedy replies
        plan.step_seconds = step_seconds
        plan.time_seconds = steps * step_seconds + per_completion * (evaluations * sampled + held_out)
        plan.measured_peak_bytes = _peak_bytes()
    plan.advice = advice(plan, recipe)
    return plan


def time_grpo_steps(trainer: Any) -> float:
    """Seconds of one GRPO step (sampling, scoring, training), from the second of two real steps."""
    clock = _StepClock()
    trainer.add_callback(clock)
    saved = trainer.args.max_steps, trainer.args.eval_strategy, trainer.args.save_strategy, trainer.args.eval_on_start
    trainer.args.max_steps, trainer.args.eval_strategy, trainer.args.save_strategy = DRY_STEPS, "no", "no"
    trainer.args.eval_on_start = False
    try:
        trainer.train()
    finally:
        trainer.args.max_steps, trainer.args.eval_strategy, trainer.args.save_strategy, trainer.args.eval_on_start = saved
        trainer.remove_callback(clock)
    return clock.ends[-1] - clock.ends[-2]


def _grpo_evaluations(args: Any, steps: int) -> int:
    strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    count = steps // args.eval_steps if strategy == "steps" and args.eval_steps else 0
    return count + 1 + int(bool(args.eval_on_start))
