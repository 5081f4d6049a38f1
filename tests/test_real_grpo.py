"""Task grpo on the real SmolLM2-135M-Instruct with the shipped recipe (Alpaca instructions with sampled
constraints): a few steps train the LoRA adapter, every logged reward is what the constraint checks make of the
logged completion, and metrics, report and model card carry the rewards."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA, require_shared

from llmtune import api
from llmtune.config.loader import load_recipe
from llmtune.rewards.constraints import check

pytestmark = pytest.mark.slow  # a real checkpoint sampling completions


def test_the_shipped_grpo_recipe_trains_smollm2_and_its_logged_rewards_follow_from_the_completions(tmp_path):
    require_shared(SHARED_DATA / "alpaca" / "alpaca_5000.json")
    out = tmp_path / "run"
    recipe = load_recipe("recipes/smollm2_grpo_constraints.yaml", [
        "training.max_steps=2", "training.batch_size=4", "training.gradient_accumulation=1",
        "training.eval_batch_size=4", "training.eval_every=no", "training.save_every=100", "eval.before_training=false",
        "data.max_train_samples=40", "data.max_eval_samples=2", "rl.max_completion_length=16",
        "training.learning_rate=1e-4", f"output.dir={out}", "output.report=true"])
    result = api.train(recipe)
    assert result["train"]["weights_changed"]
    assert {"reward", "reward_constraints", "reward_soft_overlong", "completion_length"} <= set(result["after"])
    held = result["held_out"]  # llmtune's own greedy and sampled replies to the 2 held-out prompts
    assert held["prompts"] == 2 and 0 <= held["after"]["greedy"]["pass_rate"] <= 1
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r["split"] == "train"]) == 2 * 4
    for row in rows:
        met = [check(row["completion"], c) for c in row["constraints"]]
        assert row["rewards"]["constraints"] == pytest.approx(sum(met) / len(met))
        assert row["reward"] == pytest.approx(row["rewards"]["constraints"] + 0.5 * row["rewards"]["soft_overlong"])
    report = (out / "report.html").read_text()
    assert "reward.png" in report and "rewards_per_function.png" in report
    card = (out / "README.md").read_text()
    assert "online RL from rewards (GRPO)" in card and "reward" in card
    assert json.loads((out / "metrics.json").read_text())["after"]["reward"] == result["after"]["reward"]
