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
from transformers import TrainerCallback

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


class RewardWatch(TrainerCallback):
    """Warns, once each, when GRPO is not learning what it should - read from trl's own logs:

    - no signal: in most groups every completion earned the same reward (zero spread, zero advantage) for
      `patience` logs in a row - the prompts are too hard or too easy for the rewards;
    - cut completions: most completions hit max_completion_length for `patience` logs in a row;
    - entropy collapse: the policy's entropy fell below a fifth of its first value (sampling has stopped exploring);
    - reward hacking: the training reward rose while the held-out reward did not follow.
    """

    def __init__(self, patience: int = 5, share: float = 0.8) -> None:
        self.patience, self.share = patience, share
        self.streaks = {"no_signal": 0, "cut": 0}
        self.first: dict[str, float] = {}
        self.last_train_reward: float | None = None
        self.warnings: dict[str, str] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "reward" in logs:
            self.first.setdefault("reward", logs["reward"])
            self.last_train_reward = logs["reward"]
        self._streak("no_signal", logs.get("frac_reward_zero_std"), state.global_step,
                     "in {share:.0%} or more of the groups every completion earned the same reward for {n} logs in "
                     "a row (with rl.scale_rewards=batch: the whole batch did): no signal to learn from. Make the "
                     "task easier or harder for the model, use rewards with partial credit, or raise "
                     "rl.num_generations.")
        self._streak("cut", logs.get("completions/clipped_ratio"), state.global_step,
                     "{share:.0%} or more of the completions hit rl.max_completion_length for {n} logs in a row: "
                     "their rewards judge unfinished texts. Raise rl.max_completion_length, add a soft_overlong "
                     "reward, or set rl.mask_truncated_completions=true.")
        entropy = logs.get("entropy")
        if entropy is not None:
            self.first.setdefault("entropy", entropy)
            if self.first["entropy"] > 0 and entropy < self.first["entropy"] / 5:
                self._warn("entropy", state.global_step,
                           f"the policy's entropy fell from {self.first['entropy']:.3f} to {entropy:.3f}: sampling has "
                           "stopped exploring (every completion alike). Lower the learning rate, or raise rl.beta or "
                           "rl.temperature.")

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        held_out = (metrics or {}).get("eval_reward")
        if held_out is None:
            return
        if "eval_reward" not in self.first:  # the baseline: both rises are measured from this moment
            self.first["eval_reward"] = held_out
            self.first["train_at_baseline"] = self.last_train_reward
            return
        start = self.first["train_at_baseline"]
        start = self.first.get("reward", 0.0) if start is None else start  # baseline before the first step
        rise = (self.last_train_reward or 0.0) - start
        if rise > 0.1 and held_out - self.first["eval_reward"] < rise / 4:
            self._warn("hacking", state.global_step,
                       f"the training reward rose by {rise:.3f} since the start, the held-out reward by "
                       f"{held_out - self.first['eval_reward']:.3f}: the policy may be exploiting the training prompts "
                       "or the reward. Read completions.jsonl, and compare the held-out completions.")

    def _streak(self, name: str, value: float | None, step: int, message: str) -> None:
        if value is None:
            return
        self.streaks[name] = self.streaks[name] + 1 if value >= self.share else 0
        if self.streaks[name] >= self.patience:
            self._warn(name, step, message.format(share=self.share, n=self.patience))

    def _warn(self, name: str, step: int, message: str) -> None:
        if name not in self.warnings:
            self.warnings[name] = f"step {step}: {message}"
            logger.warning("GRPO at step %d: %s", step, message)
