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
    assert {"reward", "reward_constraints", "reward_letters", "pass_rate", "distinct_1", "distinct_2",
            "unique_replies"} == set(held["after"]["greedy"])
    assert set(held["sign_test"]) == {"greedy_pass", "sampled_pass", "sampled_reward"}
    assert sum(held["sign_test"]["sampled_reward"][k] for k in ("rose", "fell", "unchanged")) == 4
    replies = [json.loads(line) for line in (out / "held_out.jsonl").read_text().splitlines()]
    assert len(replies) == 4 and all(len(r["after"]["sampled"]) == 4 and len(r["after"]["greedy"]) == 1
                                     for r in replies)
    greedy_pass = sum(r["after"]["greedy"][0]["passed"] for r in replies) / 4
    assert held["after"]["greedy"]["pass_rate"] == greedy_pass
    assert all(r["after"]["greedy"][0]["passed"] == (r["after"]["greedy"][0]["rewards"]["constraints"] == 1.0)
               for r in replies)  # constraints is the one reward with a pass line here
    sampled = [reply["text"] for r in replies for reply in r["after"]["sampled"]]
    bigrams = [tuple(w[i:i + 2]) for w in (t.lower().split() for t in sampled) for i in range(len(w) - 1)]
    assert held["after"]["sampled"]["distinct_2"] == len(set(bigrams)) / len(bigrams)
    assert held["after"]["sampled"]["unique_replies"] == len({t.strip() for t in sampled}) / 16
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


def test_classifier_and_reward_runs_reward_each_completion_as_those_runs_score_it(tiny_bert, tiny_llama, prompt_file,
                                                                                 tmp_path):
    """The lifecycle composes: a classification run's probability of a label and a reward run's score are rewards,
    each equal to what that run itself says of the completion (predict's probability; the reward model's logit on
    the pair as its task encodes it)."""
    import gzip

    import torch
    from conftest import write_reviews

    from llmtune.inference.classifier import Classifier
    from llmtune.tasks.reward import reply_ids

    reviews = write_reviews(tmp_path)
    classifier = tmp_path / "sentiment"
    api.train(load_recipe(str(Path(__file__).parents[1] / "recipes" / "quickstart.yaml"), [
        f"model.name={tiny_bert}", f"data.train_file={reviews['train']}", f"data.eval_file={reviews['eval']}",
        "data.test_file=null", f"output.dir={classifier}", "training.max_steps=2", "method.type=full",
        "training.precision=fp32", NO_REPORT]))  # fp32: the rewards batch differently from predict, exact only in fp32
    hh = SHARED_DATA / "preference" / "hh-rlhf-harmless-base-test.jsonl.gz"
    with gzip.open(require_shared(hh), "rt") as handle:
        pairs = write_jsonl(tmp_path / "hh.jsonl", [json.loads(next(handle)) for _ in range(12)])
    judge = tmp_path / "judge"
    api.train(load_recipe(None, [
        "task=reward", f"model.name={tiny_bert}", f"data.train_file={pairs}", "data.holdout_every=6",
        "data.max_length=128", "pref.max_prompt_length=96", "method.type=full", "training.max_steps=2",
        "training.batch_size=4", "training.precision=fp32", "eval.before_training=false", f"output.dir={judge}",
        NO_REPORT]))

    out = tmp_path / "run"
    api.train(recipe_for(tiny_llama, prompt_file, out, "training.max_steps=1", "eval.before_training=false",
                         f"rl.rewards=[{{classifier: {classifier}, label: positive}}, {{reward_model: {judge}}}]"))
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert rows and all(set(r["rewards"]) == {"positive", "reward_model"} for r in rows)
    said = api.predict(classifier, texts=[r["completion"] for r in rows])
    assert [r["rewards"]["positive"] for r in rows] == pytest.approx(
        [s["probabilities"]["positive"] for s in said], abs=1e-5)
    scorer = Classifier.load(judge, "fp32")
    for row in rows:
        ids = reply_ids(scorer.tokenizer, [{"role": "user", "content": row["prompt"]}],
                        [{"role": "assistant", "content": row["completion"]}], scorer.max_length)
        with torch.inference_mode():
            logit = scorer.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert row["rewards"]["reward_model"] == pytest.approx(logit, abs=1e-4)
    with pytest.raises(LlmtuneError, match=r"'rl.rewards\[0\].label' is 'joyful'.*'negative', 'positive'"):
        api.train(recipe_for(tiny_llama, prompt_file, tmp_path / "run2",
                             f"rl.rewards=[{{classifier: {classifier}, label: joyful}}]"))


def test_a_run_stopped_mid_way_resumes_from_its_checkpoint_and_logs_each_step_once(tiny_llama, prompt_file, tmp_path):
    """A reward that fails at step 4 stops the run after checkpoint-2 and step 3; --resume trains steps 3-4 again,
    the ledger keeps one group per step (the first start's step 3 is dropped) and the held-out scores from before
    training are read back, not sampled again."""
    out = tmp_path / "run"
    flaky = tmp_path / "flaky.py"
    marker = tmp_path / "fail-at-step-4"
    flaky.write_text("import pathlib\ncalls_after_checkpoint = 0\n\n"
                     "def flaky(completions, **columns):\n"
                     "    global calls_after_checkpoint\n"
                     f"    if pathlib.Path({str(marker)!r}).exists() and pathlib.Path({str(out)!r}, 'checkpoint-2').is_dir():\n"
                     "        calls_after_checkpoint += 1\n"
                     "        if calls_after_checkpoint == 2:\n"
                     "            raise RuntimeError('the judge went away')\n"
                     "    return [len(c) / 100 for c in completions]\n")
    marker.touch()
    extra = ("training.max_steps=4", "training.save_every=2", "training.eval_every=no",
             f"rl.rewards=[{{function: {flaky}:flaky}}]")
    with pytest.raises(LlmtuneError, match="the judge went away"):
        api.train(recipe_for(tiny_llama, prompt_file, out, *extra))
    first = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in first) == 3 and not (out / "checkpoint-3").exists()
    before = (out / "held_out_before.json").read_text()
    marker.unlink()
    result = api.train(recipe_for(tiny_llama, prompt_file, out, *extra), resume=True)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [sum(r["step"] == s for r in train) for s in (1, 2, 3, 4)] == [4, 4, 4, 4]
    assert [r for r in rows if r["step"] <= 2] == [r for r in first if r["step"] <= 2]
    assert result["held_out"]["before"] == json.loads(before)["summary"]
    assert not (out / "held_out_before.json").exists()  # it is in held_out.jsonl now
    assert json.loads((out / "run.json").read_text())["resumes"][0]["from_checkpoint"] == "checkpoint-2"


def test_plan_times_real_grpo_steps_sampling_included_and_writes_no_run(tiny_llama, prompt_file, tmp_path):
    from llmtune.observe.plan import format_plan

    out = tmp_path / "run"
    recipe = recipe_for(tiny_llama, prompt_file, out, "training.max_steps=10", "training.eval_every=5")
    plan = api.plan(recipe, device_memory="64GB")
    assert plan.steps["optimizer_steps"] == 10 and plan.steps["completions_per_step"] == 4
    assert plan.steps["held_out_prompts"] == 4 and plan.steps["evaluations"] == 4  # before, at 5 and 10, and after
    assert plan.fits and plan.measured_peak_bytes > 0 and 0 < plan.step_seconds
    assert plan.time_seconds >= 10 * plan.step_seconds  # the steps, plus sampling for evaluations and held-out
    text = format_plan(plan)
    assert "16 training prompts" in text and "10 optimizer steps of 4 sampled completions" in text
    assert not out.exists() and recipe.output.dir == str(out)


def test_diversity_shows_a_collapse_into_one_repeated_reply():
    from llmtune.tasks.grpo_heldout import diversity

    varied = diversity(["A fine film.", "Dull and long.", "The cast shines here."])
    collapsed = diversity(["A fine film."] * 3)
    assert varied == {"distinct_1": 1.0, "distinct_2": 1.0, "unique_replies": 1.0}
    assert collapsed == {"distinct_1": pytest.approx(1 / 3), "distinct_2": pytest.approx(1 / 3),
                         "unique_replies": pytest.approx(1 / 3)}
