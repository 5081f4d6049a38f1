"""One system on one speed-benchmark workload, in its own process (`speed.py --worker`): build its Trainer, count
the effective tokens its collator hands out, stop at the token budget, and time the steps after the first."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from flops import TokenStats, flops_per_token, is_causal, linear_layers  # noqa: E402
from speed_eval import held_out  # noqa: E402
from speed_workloads import REPO, WORKLOADS, build  # noqa: E402
from transformers import TrainerCallback  # noqa: E402 - after the offline switches
from worker import peak_rss_mb, reset_peak_rss  # noqa: E402

MIN_TIMED_STEPS = 3  # a run trains at least this many steps after the (untimed) first, whatever its budget


class TokenCounter:
    """Wraps a data collator: counts the attended (non-padding) tokens and all token slots of every batch, and the
    documents, attention pairs and loss positions the FLOP count needs."""

    def __init__(self, collator, causal: bool):
        self.collator, self.slots = collator, 0
        self.stats = TokenStats(causal)

    def __call__(self, features):
        batch = self.collator(features)
        self.slots += batch["input_ids"].numel()
        self.stats.add(batch)
        return batch

    @property
    def effective(self) -> int:
        """Attended tokens so far: each document's length, padding excluded."""
        return self.stats.tokens


class Budget(TrainerCallback):
    """Stops training once the counted effective tokens reach the budget; times the steps after the first."""

    def __init__(self, counter: TokenCounter, budget: int):
        self.counter, self.budget, self.ends, self.tokens_at = counter, budget, [], []

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        self.ends.append(time.perf_counter())
        self.tokens_at.append(self.counter.effective)
        if self.counter.effective >= self.budget and len(self.ends) > MIN_TIMED_STEPS:
            control.should_training_stop = True
        return control


def run_system(args: argparse.Namespace) -> dict:
    import torch

    workload, work = args.worker, Path(args.work)
    recipe = load_recipe_of(workload)
    args.learning_rate, args.batch_size = recipe.training.learning_rate, int(args.batch_size)
    args.compile = args.precision == "compile"
    args.precision = {"default": "fp32", "compile": "auto"}.get(args.precision, args.precision)
    if args.precision == "auto" and args.system != "llmtune":  # the precision llmtune would pick on this machine
        from llmtune.run.precision import resolved_precision

        args.precision = resolved_precision("auto")
    trainer, counter = counted_trainer(workload, args, work)
    budget = Budget(counter, int(args.token_budget))
    trainer.add_callback(budget)
    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steps = len(budget.ends) - 1
    seconds = budget.ends[-1] - budget.ends[0]
    tokens = budget.tokens_at[-1] - budget.tokens_at[0]
    result = {
        "tokens_per_s": tokens / seconds,
        "seconds_per_step": seconds / max(steps, 1),
        "timed_seconds": seconds,
        "steps": steps + 1,
        "effective_tokens": counter.effective,
        "padding_share": 1 - counter.effective / max(counter.slots, 1),
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "parameters": sum(layer.weights for layer in linear_layers(trainer.model)),  # weights multiplying tokens
        "flops_per_token": workload_flops(workload, trainer, counter),
        "precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32",
        "activation_checkpointing": bool(trainer.args.gradient_checkpointing),
    }
    max_length = recipe.data.max_length
    return {**result, **held_out(workload, trainer.model, trainer.processing_class, work, max_length,
                                 recipe.pref.beta)}


def count_flops(args: argparse.Namespace, batches: int = 100) -> dict:
    """FLOPs per effective token of one system on one workload, from its first `batches` training batches: what
    `speed.py --recount-flops` adds to results measured before the count existed."""
    workload, work = args.worker, Path(args.work)
    recipe = load_recipe_of(workload)
    args.learning_rate, args.batch_size = recipe.training.learning_rate, int(args.batch_size)
    args.compile, args.precision = False, "fp32"
    trainer, counter = counted_trainer(workload, args, work)
    for index, _ in enumerate(trainer.get_train_dataloader()):
        if index + 1 >= batches:
            break
    return {"flops_per_token": workload_flops(workload, trainer, counter)}


def counted_trainer(workload: str, args: argparse.Namespace, work: Path):
    """The system's Trainer with its collator wrapped in a TokenCounter."""
    trainer = build(workload, args.system, args, work)
    counter = TokenCounter(trainer.data_collator, is_causal(trainer.model))
    trainer.data_collator = counter
    return trainer, counter


def workload_flops(workload: str, trainer, counter: TokenCounter) -> float | None:
    """FLOPs per effective token; DPO adds the reference pass (the adapter-off model's forward, both systems)."""
    if not counter.stats.tokens:
        return None
    return flops_per_token(trainer.model, counter.stats, reference_forward=workload == "dpo")


def load_recipe_of(workload: str):
    from llmtune import load_recipe

    return load_recipe(REPO / "recipes" / WORKLOADS[workload].recipe)


def sync() -> None:
    """Wait for the GPU's queued work, so a clock read after it counts it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
