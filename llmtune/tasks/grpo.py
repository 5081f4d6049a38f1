"""Online RL from rewards: GRPO on a causal LM.

The story, top to bottom: the rewards (built-in checks, your functions, llmtune classifier or reward runs) are
loaded and checked first -> tokenizer with its chat template -> prompts (a string or a conversation, other columns
kept for the rewards), fitted to the room max_completion_length leaves -> model (a checkpoint or an llmtune SFT
run; full, LoRA, DoRA, QLoRA) -> trl's GRPOTrainer (llmtune/tasks/grpo_trainers.py), which samples
rl.num_generations completions per prompt, scores them and moves the policy towards the better ones of each group.
Every scored completion is appended to completions.jsonl in the run directory. The held-out prompts are scored
before and after (trl's sampled evaluation; llmtune's greedy and sampled pass rates with a sign test,
grpo_heldout.py), and the run is saved as for SFT.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from llmtune.config.schema import Recipe
from llmtune.data.lm_tokenize import setup_chat_template
from llmtune.data.preference import chat_prompt_tokens
from llmtune.data.prompts import load_prompt_splits
from llmtune.errors import LlmtuneError
from llmtune.inference.generation import GenerationLogger
from llmtune.models.loading import load_tokenizer
from llmtune.models.quantization import keep_adapters_in_compute_dtype
from llmtune.models.sources import ResolvedModel
from llmtune.rewards.constraints import constrain, constraint_problem
from llmtune.run.checkpoints import checkpoint_step, newest_complete
from llmtune.run.distributed import main_process_first
from llmtune.run.precision import resolved_precision
from llmtune.tasks.grpo_heldout import HeldOut
from llmtune.tasks.grpo_rewards import CompletionLedger, build_scorer, check_rewards, reward_names
from llmtune.tasks.grpo_trainers import RewardWatch, build_trainer, summarize
from llmtune.tasks.job import Job
from llmtune.tasks.preference import check_decoder, drop_reference_adapter, policy_model, sft_parent

COMPLETIONS_FILE = "completions.jsonl"


def build(recipe: Recipe, source: ResolvedModel | None, run_dir: Path, resume: bool = False) -> Job:
    """Load, prepare and wrap everything into a ready-to-train GRPOTrainer (nothing sampled or trained yet)."""
    assert source is not None, "grpo starts from a checkpoint (rules.py refuses model.init=scratch)"
    check_decoder(source.path, recipe)
    parent = sft_parent(source.path)

    # 1. Rewards first: a missing file, function or run fails before any model loads
    names = reward_names(recipe.rl.rewards)
    weights = [float(item.get("weight", 1.0)) for item in recipe.rl.rewards]
    scorers = reward_scorers(recipe)

    # 2. Tokenizer with its chat template, then the prompts (rows dropped counted)
    with main_process_first():
        tokenizer, added_tokens, splits, dropped = load_data(recipe, source)
    check_reward_columns(recipe, splits)

    # 3. Model: the checkpoint, or the SFT run's model (its adapter merged, or trained further)
    model, model_path, new_adapter = policy_model(recipe, source, parent, ("rl.sft_adapter", recipe.rl.sft_adapter),
                                                  tokenizer, added_tokens)

    # 4. trl's trainer, its reward callables writing completions.jsonl
    ledger = CompletionLedger(run_dir / COMPLETIONS_FILE, names, weights)
    if resume and (checkpoint := newest_complete(run_dir)[0]):
        ledger.keep_until(checkpoint_step(checkpoint) or 0)  # the steps after it are trained, and logged, again
    rewards = [ledger.reward(name, scorer, f"rl.rewards[{i}]") for i, (name, scorer) in enumerate(zip(names, scorers))]
    watch = RewardWatch()
    callbacks = [watch]
    if recipe.lm.generation_prompts:
        callbacks.append(GenerationLogger(run_dir / "generations.jsonl", recipe.lm.generation_prompts,
                                          recipe.lm.max_new_tokens, chat=True))
    trainer = build_trainer(recipe, model, tokenizer, rewards, weights, splits["train"], splits.get("eval"), run_dir,
                            resume, callbacks, new_adapter)
    ledger.trainer = trainer
    keep_adapters_in_compute_dtype(trainer.model, recipe.method)
    held_out = HeldOut(recipe, splits["eval"], names, weights, scorers, resume) if "eval" in splits else None
    if held_out:
        held_out.model, held_out.tokenizer = trainer.model, tokenizer

    def after_training(run_dir: Path) -> dict[str, Any]:
        measured = held_out.after(run_dir) if held_out else {}
        return {**measured, **drop_reference_adapter(trainer.model), "rl_warnings": dict(watch.warnings)}

    sizes = {split: len(rows) for split, rows in splits.items()}
    record = {"rows": sizes, "dropped": dropped, "rewards": dict(zip(names, weights))}
    if parent:
        record["sft_parent"] = parent
    return Job(trainer, model_path, summarize=summarize(names), record=record,
               metrics={"data": {"rows": sizes, "dropped": dropped}}, after_training=after_training,
               before_training=held_out.before if held_out else None)


def validate(recipe: Recipe, source: ResolvedModel | None) -> dict[str, Any]:
    """What `llmtune validate` reports: the rewards found, the prompts kept and dropped per split."""
    assert source is not None
    check_decoder(source.path, recipe)
    reward_scorers(recipe)
    _, _, splits, dropped = load_data(recipe, source)
    check_reward_columns(recipe, splits)
    return {"rows": {s: len(r) for s, r in splits.items()}, "dropped": dropped,
            "rewards": reward_names(recipe.rl.rewards)}


COLUMNS_READ = {"constraints": "constraints", "all_constraints": "constraints", "exact_answer": "answer"}


def check_reward_columns(recipe: Recipe, splits: dict[str, Any]) -> None:
    """The columns the built-in rewards read are in every split, and each row's constraints are ones llmtune can
    check - before any model loads, not at the first step."""
    for i, item in enumerate(recipe.rl.rewards):
        column = COLUMNS_READ.get(item.get("function"))
        for split, rows in splits.items() if column else ():
            if column not in rows.column_names:
                raise LlmtuneError(
                    f"rl.rewards[{i}] ({item['function']}) reads a '{column}' column, and the {split} prompts have "
                    f"none (columns: {', '.join(rows.column_names)}). Add it, map it with data.columns, or for "
                    "instruction constraints set rl.add_constraints=2 to sample them."
                )
            if column == "constraints":
                for row, constraints in enumerate(rows["constraints"]):
                    for k, constraint in enumerate(constraints or []):
                        if problem := constraint_problem(constraint, f"the {split} prompts' row {row} constraint {k}"):
                            raise LlmtuneError(f"{problem} Fix the data, or drop the constraints reward.")


def check_before_loading(recipe: Recipe) -> None:
    """Each reward's file and function, or run of the right kind, exists (the pipeline calls this first)."""
    check_rewards(recipe.rl.rewards)


def reward_scorers(recipe: Recipe) -> list[Any]:
    precision = resolved_precision(recipe.training.precision) if recipe.training.precision != "auto" else "auto"
    return [build_scorer(item, f"rl.rewards[{i}]", recipe.rl.max_completion_length, precision)
            for i, item in enumerate(recipe.rl.rewards)]


def load_data(recipe: Recipe, source: ResolvedModel) -> tuple[Any, bool, dict[str, Any], dict]:
    """(tokenizer with its chat template, whether that added tokens, the prompt splits, rows dropped per split)."""
    tokenizer = load_tokenizer(source.path, recipe)
    added_tokens = setup_chat_template(tokenizer, recipe.lm.chat_template)
    room = recipe.rl.max_prompt_length or recipe.data.max_length - recipe.rl.max_completion_length
    seed, most = recipe.training.seed, recipe.rl.add_constraints
    prepare = (lambda rows, split: with_constraints(rows, most, f"{seed}-{split}")) if most else None
    splits, dropped = load_prompt_splits(recipe.data, seed, chat_prompt_tokens(tokenizer), room, prepare)
    return tokenizer, added_tokens, splits, dropped


def with_constraints(rows: Any, most: int, seed: str) -> Any:
    """rl.add_constraints: each prompt's last user turn asks for 1..`most` sampled constraints, which the row's
    `constraints` column records; row i of a split always draws the same ones."""
    def add(row: dict[str, Any], index: int) -> dict[str, Any]:
        prompt = [dict(m) for m in row["prompt"]]
        prompt[-1]["content"], constraints = constrain(prompt[-1]["content"], random.Random(f"{seed}-{index}"), most)
        return {"prompt": prompt, "constraints": constraints}

    return rows.map(add, with_indices=True, desc="Adding instruction constraints")
