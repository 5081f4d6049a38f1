"""Task grpo end to end on a tiny Llama (SmolLM2's tokenizer and chat template) with real Alpaca instructions and
sampled constraints: each loss type trains, every scored completion lands in completions.jsonl and matches what
trl logged, beta = 0 loads no reference, a user reward reads the prompts' own columns, and bad rewards stop the
run with one paragraph."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import NO_REPORT, SHARED_DATA, require_shared, write_jsonl

from llmtune import api
from llmtune.config.loader import load_recipe
from llmtune.errors import LlmtuneError
from llmtune.rewards.constraints import constrained_prompts

pytestmark = pytest.mark.slow


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    """20 Alpaca instructions with 1-2 sampled constraints each (16 train, 4 held out by data.holdout_every=5)."""
    source = require_shared(SHARED_DATA / "alpaca" / "alpaca_5000.json")
    instructions = [r["instruction"] for r in json.loads(source.read_text()) if not r["input"]][:20]
    rows = constrained_prompts(instructions, seed=0)
    for i, row in enumerate(rows):
        row["target"] = 5 + i % 3  # a column of their own, for a user reward
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def letters_reward(folder: Path) -> str:
    """A reward that differs between a random model's completions (constraints alone rarely do: no signal)."""
    path = folder / "letters.py"
    path.write_text("def letters(completions, **columns):\n"
                    "    return [sum(ch.isalpha() for ch in c) / max(len(c), 1) for c in completions]\n")
    return f"{path}:letters"


def recipe_for(model: str, data: Path, out: Path, *extra: str):
    return load_recipe(None, [
        "task=grpo", f"model.name={model}", f"data.train_file={data}", "data.holdout_every=5",
        "data.max_length=160", "method.type=lora", "training.max_steps=2", "training.batch_size=4",
        "training.eval_batch_size=4", "training.learning_rate=5e-3", "training.log_every=1",
        "training.eval_every=2", "training.precision=fp32", "rl.num_generations=4", "rl.max_completion_length=12",
        f"rl.rewards=[{{function: constraints}}, {{function: {letters_reward(data.parent)}, weight: 0.5}}]",
        f"output.dir={out}", NO_REPORT, *extra,
    ])


@pytest.mark.parametrize("loss_type, scale", [("dapo", "group"), ("grpo", "batch"), ("dr_grpo", "none"),
                                              ("bnpo", "group")])
def test_each_loss_type_trains_and_logs_every_completion_it_scored(tiny_llama, prompt_file, tmp_path, loss_type,
                                                                   scale):
    out = tmp_path / "run"
    result = api.train(recipe_for(tiny_llama, prompt_file, out, f"rl.loss_type={loss_type}",
                                  f"rl.scale_rewards={scale}"))
    assert result["train"]["weights_changed"]
    assert {"reward", "reward_std", "completion_length", "clipped_ratio", "reward_constraints"} <= set(result["after"])
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [sum(r["step"] == s for r in train) for s in (1, 2)] == [4, 4]  # one prompt's group per step
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    for step in (1, 2):
        logged = next(h for h in history if h.get("step") == step and "reward" in h)
        mine = [r for r in train if r["step"] == step]
        assert logged["reward"] == pytest.approx(sum(r["reward"] for r in mine) / len(mine), abs=1e-5)
        assert logged["rewards/constraints/mean"] == pytest.approx(
            sum(r["rewards"]["constraints"] for r in mine) / len(mine), abs=1e-5)
    held_out = [r for r in rows if r["split"] == "eval"]
    # before (step 0), at eval_every=2 and after: 4 held-out prompts x 4 completions each time
    assert [sum(r["step"] == s for r in held_out) for s in (0, 2)] == [16, 32] and len(held_out) == 48
    held = result["held_out"]  # greedy and sampled replies to the 4 held-out prompts, before and after
    assert held["prompts"] == 4 and set(held["before"]) == set(held["after"]) == {"greedy", "sampled"}
    assert {"reward", "reward_constraints", "reward_letters", "pass_rate"} == set(held["after"]["greedy"])
    assert set(held["sign_test"]) == {"greedy_pass", "sampled_pass"}
    replies = [json.loads(line) for line in (out / "held_out.jsonl").read_text().splitlines()]
    assert len(replies) == 4 and all(len(r["after"]["sampled"]) == 4 and len(r["after"]["greedy"]) == 1
                                     for r in replies)
    greedy_pass = sum(r["after"]["greedy"][0]["passed"] for r in replies) / 4
    assert held["after"]["greedy"]["pass_rate"] == greedy_pass
    assert all(r["after"]["greedy"][0]["passed"] == (r["after"]["greedy"][0]["rewards"]["constraints"] == 1.0)
               for r in replies)  # constraints is the one reward with a pass line here
    record = json.loads((out / "run.json").read_text())
    assert record["rows"] == {"train": 16, "eval": 4} and record["rewards"] == {"constraints": 1.0, "letters": 0.5}


def test_beta_zero_loads_no_reference_and_beta_above_uses_the_adapter_off_policy(tiny_llama, prompt_file, tmp_path):
    for beta in (0.0, 0.04):
        trainer = api.build_trainer(recipe_for(tiny_llama, prompt_file, tmp_path / f"run{beta}", f"rl.beta={beta}"))
        assert trainer.ref_model is None and "ref" not in trainer.model.peft_config
        assert trainer.beta == beta


def test_a_user_reward_reads_the_prompts_own_columns(tiny_llama, prompt_file, tmp_path):
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text("def near_target(completions, target):\n"
                       "    return [-abs(len(c.split()) - t) for c, t in zip(completions, target)]\n")
    out = tmp_path / "run"
    api.train(recipe_for(tiny_llama, prompt_file, out, f"rl.rewards=[{{function: {rewards}:near_target}}]",
                         "training.max_steps=1", "eval.before_training=false"))
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    targets = {json.loads(line)["prompt"].split("\n\n")[0]: json.loads(line)["target"]
               for line in prompt_file.read_text().splitlines()}
    for row in rows:
        wanted = targets[row["prompt"].split("\n\n")[0]]
        assert row["rewards"]["near_target"] == -abs(len(row["completion"].split()) - wanted)


def test_a_reward_returning_the_wrong_length_stops_the_run_with_one_paragraph(tiny_llama, prompt_file, tmp_path):
    rewards = tmp_path / "bad.py"
    rewards.write_text("def one(completions, **kwargs):\n    return [1.0]\n")
    with pytest.raises(LlmtuneError, match=r"Reward 'one' \(rl.rewards\[0\]\) returned 1 values for 4 completions"):
        api.train(recipe_for(tiny_llama, prompt_file, tmp_path / "run", f"rl.rewards=[{{function: {rewards}:one}}]",
                             "eval.before_training=false"))


def test_a_missing_reward_file_or_run_is_refused_before_any_model_loads(tiny_llama, prompt_file, tmp_path):
    out = tmp_path / "run"
    for reward, message in ((f"{{function: {tmp_path / 'missing.py'}:f}}", "missing.py', which does not exist"),
                            (f"{{classifier: {tmp_path / 'no-run'}, label: positive}}", "no-run', which is not a folder"),
                            (f"{{reward_model: {tiny_llama}}}", "not an llmtune reward run")):
        with pytest.raises(LlmtuneError, match=message):
            api.train(recipe_for(tiny_llama, prompt_file, out, f"rl.rewards=[{reward}]"))
        assert not out.exists()
