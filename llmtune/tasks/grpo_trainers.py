"""trl's GRPOTrainer behind llmtune's recipe: the only module that names it and its config fields, so a trl rename
is absorbed here.

    grpo -> GRPOTrainer (prompts; completions sampled in groups of rl.num_generations, scored by rl.rewards)

The reference of the KL term (rl.beta > 0): with adapters, the policy with its adapters turned off (no second
model); with full fine-tuning, trl loads a frozen copy of the starting checkpoint. rl.beta = 0 loads none.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from llmtune.config.schema import Recipe
from llmtune.models.adapters import is_adapter
from llmtune.run.training import training_arguments

logger = logging.getLogger(__name__)

# llmtune's metric names -> the keys trl logs (after its 'eval_' prefix at evaluation).
METRIC_KEYS = {"reward": "reward", "reward_std": "reward_std", "completion_length": "completions/mean_length",
               "clipped_ratio": "completions/clipped_ratio"}
MAIN_METRIC = "reward"


def grpo_arguments(recipe: Recipe, weights: list[float]) -> dict[str, Any]:
    """trl's GRPOConfig fields from the recipe's `rl` section."""
    rl = recipe.rl
    return {
        "num_generations": rl.num_generations, "max_completion_length": rl.max_completion_length,
        "temperature": rl.temperature, "top_p": rl.top_p, "loss_type": rl.loss_type,
        "scale_rewards": rl.scale_rewards, "beta": rl.beta, "epsilon": rl.epsilon,
        "epsilon_high": rl.epsilon_high if rl.epsilon_high is not None else rl.epsilon,
        "mask_truncated_completions": rl.mask_truncated_completions, "num_iterations": rl.num_iterations,
        "reward_weights": weights,
        "disable_dropout": True,  # completions are sampled from the policy itself, not a dropout-thinned copy
        "log_completions": False,  # llmtune's completions.jsonl keeps every batch, not only logging steps'
        "remove_unused_columns": False,  # the prompts' other columns go to the reward functions
    }


def build_trainer(recipe: Recipe, model: torch.nn.Module, tokenizer: Any, rewards: list[Any], weights: list[float],
                  train: Any, eval_set: Any, run_dir: Path, resume: bool, callbacks: list, new_adapter: bool) -> Any:
    """trl's GRPOTrainer for the recipe (nothing sampled yet)."""
    from trl import GRPOConfig, GRPOTrainer

    args = training_arguments(recipe, str(run_dir), MAIN_METRIC, eval_set is not None, resume, GRPOConfig,
                              padded=False, metric_keys=METRIC_KEYS, **grpo_arguments(recipe, weights))
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=train, eval_dataset=eval_set,
                          processing_class=tokenizer, callbacks=callbacks)
    if is_adapter(model) and new_adapter and "ref" in model.peft_config:
        # trl copies a PeftModel's adapter as the reference ("ref"). A new adapter starts as a no-op, so the policy
        # with adapters off is the same reference without the copy.
        model.delete_adapter("ref")
    logger.info("KL reference: %s", describe_reference(recipe, model, new_adapter))
    return trainer


def describe_reference(recipe: Recipe, model: Any, new_adapter: bool) -> str:
    if recipe.rl.beta == 0:
        return "none (rl.beta is 0: no KL term, no reference pass)"
    if is_adapter(model):
        return ("the policy with its adapters turned off (no second model)" if new_adapter
                else "a frozen copy of the adapter training continues from")
    return "a frozen copy of the starting model"


def summarize(names: list[str]) -> Any:
    """trl's GRPO metrics (with a prefix) -> llmtune's names; each reward's mean as reward_<name>."""
    keys = {**METRIC_KEYS, **{f"reward_{name}": f"rewards/{name}/mean" for name in names}}

    def metrics(raw: dict[str, float], prefix: str) -> dict[str, float]:
        found = {}
        for name, key in keys.items():
            for candidate in (f"{prefix}{key}", f"eval_{key}"):
                if candidate in raw:
                    found[name] = raw[candidate]
                    break
        return found

    return metrics
