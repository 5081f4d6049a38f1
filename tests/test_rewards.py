"""Task grpo's built-in rewards against hand-written cases, the constrained-prompt builder, user reward files and
the recipe rules of the rl section - no model involved."""

from __future__ import annotations

import inspect
import random

import pytest

from llmtune.config.loader import load_recipe
from llmtune.config.rules import check
from llmtune.config.vocab import BUILTIN_REWARDS
from llmtune.errors import LlmtuneError
from llmtune.rewards import builtin, constraints
from llmtune.tasks.grpo_rewards import CompletionLedger, checked, reward_names

CASES = [  # (constraint, a text that meets it, one that does not)
    ({"kind": "lowercase"}, "all small here.", "Not all small."),
    ({"kind": "uppercase"}, "SHOUTING ONLY!", "Mostly SHOUTING"),
    ({"kind": "no_commas"}, "no commas at all", "one, two"),
    ({"kind": "max_words", "number": 3}, "one two three", "one two three four"),
    ({"kind": "min_words", "number": 3}, "one two three", "one two"),
    ({"kind": "max_sentences", "number": 1}, "Just one sentence here.", "One. Two."),
    ({"kind": "min_sentences", "number": 2}, "One. Two!", "Only one."),
    ({"kind": "include_keywords", "words": ["river", "Stone"]}, "A stone by the river.", "A river, no rock."),
    ({"kind": "forbid_keywords", "words": ["very"]}, "Every day is fine.", "It is very fine."),
    ({"kind": "starts_with", "text": "Sure"}, "  Sure, here it is.", "Here it is. Sure"),
    ({"kind": "ends_with", "text": "That is all."}, "Done. That is all.\n", "That is all. More."),
    ({"kind": "quoted"}, '"a quoted answer"', 'a "partly" quoted answer'),
    ({"kind": "bullets", "number": 2}, "Points:\n* one\n- two", "Points:\n* one\n* two\n* three"),
    ({"kind": "sections", "number": 2}, "SECTION 1\nabc\nSECTION 2\ndef", "SECTION 1\nonly one"),
    ({"kind": "json"}, '```json\n{"a": [1, 2]}\n```', "{'a': 1}"),
]


@pytest.mark.parametrize("constraint, good, bad", CASES, ids=[c[0]["kind"] for c in CASES])
def test_each_constraint_accepts_what_it_asks_for_and_refuses_what_it_does_not(constraint, good, bad):
    assert constraints.check(good, constraint) and not constraints.check(bad, constraint)


def test_every_kind_has_a_hand_written_case_and_an_instruction():
    assert {c[0]["kind"] for c in CASES} == set(constraints.KINDS)
    for constraint, _, _ in CASES:
        assert constraints.instruction(constraint).endswith(".")


def test_the_constraint_rewards_score_the_share_met_and_all_met():
    rows = [[{"kind": "lowercase"}, {"kind": "max_words", "number": 3}], [{"kind": "no_commas"}], []]
    texts = ["two words", "Three, Words", "anything"]
    assert builtin.constraints(texts, constraints=rows) == [1.0, 0.0, None]
    assert builtin.constraints(["Two words"], constraints=rows[:1]) == [0.5]
    assert builtin.all_constraints(["Two words", "two words"], constraints=[rows[0], rows[0]]) == [0.0, 1.0]
    chat = [[{"role": "assistant", "content": "two words"}]]  # trl's completions for chat prompts
    assert builtin.constraints(chat, constraints=rows[:1]) == [1.0]


@pytest.mark.parametrize("text, answer, reward", [
    ("So she pays 3 + 4 = 7 dollars.\n#### 7", "Natalia... #### 7", 1.0),
    ("The answer is \\boxed{1,250}.", "1250", 1.0),
    ("First 12, then 15. So 18", "#### 18", 1.0),
    ("It is 18.0 in the end", "18", 1.0),
    ("#### 17 but maybe 18", "#### 18", 0.0),
    ("no number at all", "5", 0.0),
])
def test_exact_answer_reads_the_final_number_as_gsm8k_writes_it(text, answer, reward):
    assert builtin.exact_answer([text], answer=[answer]) == [reward]


def test_regex_and_the_soft_overlong_penalty():
    assert builtin.regex(["<think>x</think> 4", "4"], pattern=r"^<think>.*</think>") == [1.0, 0.0]
    assert builtin.regex(["abc", "abcd"], pattern="abc", full=True) == [1.0, 0.0]
    ids = [[0] * n for n in (10, 12, 14, 16, 20)]
    assert builtin.soft_overlong(["x"] * 5, completion_ids=ids, max_length=16, cache=4) == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_a_missing_column_is_named_with_the_columns_there_are():
    with pytest.raises(LlmtuneError, match="'answer' column.*columns: constraints"):
        builtin.exact_answer(["4"], constraints=[[]])


def test_the_recipe_vocabulary_names_every_built_in_with_its_parameters():
    assert set(BUILTIN_REWARDS) == set(builtin.BUILTIN)
    for name, params in BUILTIN_REWARDS.items():
        assert set(params) <= set(inspect.signature(builtin.BUILTIN[name]).parameters)


def test_the_prompt_builder_is_seeded_and_asks_for_exactly_its_constraints():
    instructions = ["Describe a river.", "Name three fruits.", "Explain rain."] * 20
    rows = constraints.constrained_prompts(instructions, seed=3, most=2)
    assert rows == constraints.constrained_prompts(instructions, seed=3, most=2)
    assert rows != constraints.constrained_prompts(instructions, seed=4, most=2)
    for row, text in zip(rows, instructions):
        assert 1 <= len(row["constraints"]) <= 2 and row["prompt"].startswith(text)
        for c in row["constraints"]:
            assert constraints.instruction(c) in row["prompt"] and constraints.constraint_problem(c, "x") is None
        kinds = {c["kind"] for c in row["constraints"]}
        assert not {"lowercase", "uppercase"} <= kinds and not {"json", "quoted"} <= kinds
    assert len({c["kind"] for r in rows for c in r["constraints"]}) >= 10  # the sampler covers the table
    with pytest.raises(LlmtuneError, match='Did you mean "lowercase"'):
        constraints.constrained_prompts(["x"], seed=0, kinds=["lowercas"])
    assert constraints.sample_constraints(random.Random(0), 1, ["json"]) == [{"kind": "json"}]


def test_user_reward_files_are_loaded_by_path_and_their_mistakes_named(tmp_path):
    good = tmp_path / "my_rewards.py"
    good.write_text("def short(completions, target):\n    return [float(len(c) <= t) for c, t in zip(completions, target)]\n")
    function = builtin.bind(builtin.load_function(f"{good}:short", "x"), {})
    assert function(["ab", "abcd"], target=[3, 3], prompts=["p", "p"], completion_ids=[[1], [2]]) == [1.0, 0.0]
    with pytest.raises(LlmtuneError, match="does not exist"):
        builtin.load_function(f"{tmp_path / 'nope.py'}:short", "x")
    with pytest.raises(LlmtuneError, match="no function 'shrt'. Did you mean \"short\""):
        builtin.load_function(f"{good}:shrt", "x")
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(LlmtuneError, match="ModuleNotFoundError"):
        builtin.load_function(f"{broken}:f", "x")
    with pytest.raises(LlmtuneError, match='Did you mean "exact_answer"'):
        builtin.load_function("exact_answr", "x")


def test_a_reward_that_returns_the_wrong_length_or_a_non_number_is_named(tmp_path):
    with pytest.raises(LlmtuneError, match=r"Reward 'r' \(rl.rewards\[0\]\) returned 1 values for 2 completions"):
        checked([1.0], 2, "r", "rl.rewards[0]")
    with pytest.raises(LlmtuneError, match="returned 'high'"):
        checked(["high", 1], 2, "r", "rl.rewards[0]")
    ledger = CompletionLedger(tmp_path / "c.jsonl", ["r"], [1.0])
    raising = ledger.reward("r", lambda completions, **_: 1 / 0, "rl.rewards[0]")
    with pytest.raises(LlmtuneError, match="Reward 'r' .* raised ZeroDivisionError"):
        raising(prompts=["p"], completions=["c"], completion_ids=[[1]])


def test_the_ledger_writes_each_completion_with_every_reward_and_the_weighted_sum(tmp_path):
    import json

    ledger = CompletionLedger(tmp_path / "c.jsonl", ["a", "b"], [1.0, -0.5])
    first = ledger.reward("a", lambda completions, **_: [1.0, None], "rl.rewards[0]")
    second = ledger.reward("b", lambda completions, **_: [2.0, 4.0], "rl.rewards[1]")
    prompts = [[{"role": "user", "content": "hi"}]] * 2
    assert first(prompts=prompts, completions=["x", "y"], completion_ids=[[1], [2]], trainer_state=None) == [1.0, None]
    assert not (tmp_path / "c.jsonl").exists()  # written after the last reward of the batch
    second(prompts=prompts, completions=["x", "y"], completion_ids=[[1], [2]])
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["completion"], r["rewards"], r["reward"]) for r in rows] == [
        ("hi", "x", {"a": 1.0, "b": 2.0}, 0.0), ("hi", "y", {"a": None, "b": 4.0}, -2.0)]


def test_reward_names_are_unique_and_readable():
    assert reward_names([{"function": "constraints"}, {"function": "a/b.py:score"}, {"function": "constraints"},
                         {"classifier": "runs/sst2", "label": "positive"}, {"function": "regex", "name": "fmt"}]) == [
        "constraints", "score", "constraints_2", "positive", "fmt"]


GRPO = ["task=grpo", "model.name=x", "data.train_file=p.jsonl"]


def problems(*overrides: str) -> str:
    with pytest.raises(LlmtuneError) as error:
        check(load_recipe(None, list(overrides)))
    return str(error.value)


def test_the_rl_rules_refuse_what_trl_would_refuse_later_or_never():
    assert "needs 'rl.rewards'" in problems(*GRPO)
    assert 'Did you mean "constraints"' in problems(*GRPO, "rl.rewards=[{function: constrains}]")
    assert "exactly one of function, classifier, reward_model" in problems(
        *GRPO, "rl.rewards=[{function: constraints, classifier: runs/x, label: a}]")
    assert "name the 'label'" in problems(*GRPO, "rl.rewards=[{classifier: runs/sst2}]")
    assert "needs a 'pattern'" in problems(*GRPO, "rl.rewards=[{function: regex}]")
    assert "unknown key 'wieght'" in problems(*GRPO, "rl.rewards=[{function: constraints, wieght: 2}]")
    message = problems(*GRPO, "rl.rewards=[{function: constraints}]", "training.batch_size=6",
                       "training.eval_batch_size=8", "rl.num_generations=4")
    assert "6 completions per step, which is not a multiple of 'rl.num_generations' (4)" in message
    assert "rl.num_generations=3" in message  # the nearest group size that divides
    assert "only task grpo reads it" in problems("task=sft", "data.train_file=p.jsonl",
                                                 "rl.rewards=[{function: regex}]")
    check(load_recipe(None, [*GRPO, "rl.rewards=[{function: constraints}]", "training.batch_size=4",
                             "rl.num_generations=4"]))


def test_reward_paths_are_anchored_at_the_recipe_folder(tmp_path):
    recipe_file = tmp_path / "sub" / "grpo.yaml"
    recipe_file.parent.mkdir()
    recipe_file.write_text("task: grpo\ndata:\n  train_file: p.jsonl\nrl:\n  rewards:\n"
                           "    - {function: my_rewards.py:score, weight: 2}\n"
                           "    - {classifier: ../runs/sst2, label: positive}\n    - {function: constraints}\n")
    rewards = load_recipe(str(recipe_file)).rl.rewards
    assert rewards[0]["function"] == f"{recipe_file.parent / 'my_rewards.py'}:score" and rewards[0]["weight"] == 2
    assert rewards[1]["classifier"] == str((tmp_path / "runs" / "sst2").resolve())
    assert rewards[2]["function"] == "constraints"


def test_data_constraints_writes_seeded_prompts_from_an_instruction_file_and_keeps_existing_files(tmp_path, capsys):
    import json

    from llmtune.cli import main

    source = tmp_path / "instructions.json"
    source.write_text(json.dumps([{"instruction": "Describe a river.", "input": ""},
                                  {"instruction": "Summarise this.", "input": "Rain fell all day."}] * 3))
    out = tmp_path / "prompts.jsonl"
    assert main(["data", "constraints", str(source), "--out", str(out), "--per-prompt", "1", "--seed", "5"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == constraints.constrained_prompts(["Describe a river.", "Summarise this.\n\nRain fell all day."] * 3,
                                                   seed=5, most=1)
    before = out.read_text()
    assert main(["data", "constraints", str(source), "--out", str(out)]) != 0
    assert "exists; llmtune does not overwrite it" in capsys.readouterr().err and out.read_text() == before


def test_the_reward_watch_warns_once_on_each_constructed_failure(caplog):
    from types import SimpleNamespace

    from llmtune.tasks.grpo_trainers import RewardWatch

    def feed(watch, step, **logs):
        watch.on_log(None, SimpleNamespace(global_step=step), None, logs)

    healthy = RewardWatch(patience=3)
    healthy.on_evaluate(None, SimpleNamespace(global_step=0), None, {"eval_reward": 0.3})  # before the first step
    for step in range(1, 10):
        feed(healthy, step, reward=0.3 + step / 100, frac_reward_zero_std=0.5, entropy=1.0 - step / 100,
             **{"completions/clipped_ratio": 0.1})
    healthy.on_evaluate(None, SimpleNamespace(global_step=9), None, {"eval_reward": 0.38})
    assert healthy.warnings == {}

    stuck = RewardWatch(patience=3)
    stuck.on_evaluate(None, SimpleNamespace(global_step=0), None, {"eval_reward": 0.2})
    for step in range(1, 7):
        feed(stuck, step, reward=0.1 + step / 10, frac_reward_zero_std=0.9 if step > 1 else 0.1,
             entropy=2.0 if step == 1 else 0.3, **{"completions/clipped_ratio": 1.0})
    stuck.on_evaluate(None, SimpleNamespace(global_step=6), None, {"eval_reward": 0.21})
    assert set(stuck.warnings) == {"no_signal", "cut", "entropy", "hacking"}
    assert stuck.warnings["no_signal"].startswith("step 4:")  # three logs in a row, from step 2
    assert sum("GRPO at step" in r.message for r in caplog.records) == 4  # each once, though the logs go on


def test_the_sign_test_is_the_exact_binomial_tail_and_ignores_ties():
    from llmtune.tasks.grpo_heldout import sign_test

    assert sign_test([0, 0, 1, 0], [1, 1, 1, 0]) == {"rose": 2, "fell": 0, "unchanged": 2, "p_value": 0.25}
    test = sign_test([0] * 8 + [1] + [0.5] * 3, [1] * 8 + [0] + [0.5] * 3)
    assert (test["rose"], test["fell"], test["unchanged"]) == (8, 1, 3)
    assert test["p_value"] == pytest.approx(10 / 512)  # P(X >= 8), X ~ Binomial(9, 1/2)
    assert sign_test([1, 1], [1, 1])["p_value"] == 1.0


def test_review_cases_numbers_silence_and_incompatible_kinds():
    assert builtin.final_answer("Buy 3-4 apples") == "4" and builtin.final_answer("It costs 0.50") == "0.5"
    assert builtin.exact_answer(["#### 1,250.00"], answer=["1250"]) == [1.0]
    assert builtin.constraints(["", "   "], constraints=[[{"kind": "no_commas"}]] * 2) == [0.0, 0.0]
    for seed in range(200):
        kinds = {c["kind"] for c in constraints.sample_constraints(random.Random(seed), 3)}
        assert not {"lowercase", "sections"} <= kinds  # "SECTION 1" cannot be lowercase


def test_rewards_output_is_checked_bools_count_and_infinities_do_not():
    assert checked([True, 0, 0.5, None, float("nan")], 5, "r", "w") == [1.0, 0.0, 0.5, None, None]
    with pytest.raises(LlmtuneError, match="finite numbers"):
        checked([float("inf")], 1, "r", "w")
    with pytest.raises(LlmtuneError, match="returned '1'"):
        checked(["1"], 1, "r", "w")


def test_the_pass_line_follows_each_weights_sign_and_skips_weight_zero():
    from types import SimpleNamespace

    from llmtune.tasks.grpo_heldout import HeldOut

    recipe = load_recipe(None, [*GRPO, "rl.rewards=[{function: constraints}, {function: regex, pattern: sorry, "
                                       "weight: -1}, {function: soft_overlong, weight: 0}]"])
    held = HeldOut(recipe, SimpleNamespace(), ["constraints", "regex", "soft_overlong"], [1.0, -1.0, 0.0], [])
    assert held.best == {"constraints": 1.0, "regex": 0.0}
    assert held.passes({"constraints": 1.0, "regex": 0.0, "soft_overlong": -1.0})
    assert not held.passes({"constraints": 1.0, "regex": 1.0, "soft_overlong": 0.0})  # said sorry: penalised
    assert held.total({"constraints": None, "regex": None, "soft_overlong": None}) is None  # as trl: left out


def test_more_rl_rules_bad_pattern_shared_names_and_no_room():
    assert "not a valid regular expression" in problems(*GRPO, "rl.rewards=[{function: regex, pattern: '(unclosed'}]")
    assert "names two rewards 'a'" in problems(*GRPO, "rl.rewards=[{function: constraints, name: a}, "
                                                      "{function: regex, pattern: x, name: a}]")
    assert "hide the reward spread" in problems(*GRPO, "rl.rewards=[{function: constraints, name: std}]")
    assert "leaves no room for a prompt" in problems(*GRPO, "rl.rewards=[{function: constraints}]",
                                                     "data.max_length=64", "rl.max_completion_length=64")


def test_chats_become_prompts_up_to_their_last_user_turn_and_constraint_columns_are_checked_first():
    from datasets import Dataset

    from llmtune.data.prompts import to_prompts
    from llmtune.tasks.grpo import check_reward_columns

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = to_prompts(Dataset.from_list([{"messages": chat, "constraints": [{"kind": "lowercse"}]}]), "messages", None)
    assert rows[0]["prompt"] == chat[:1]
    recipe = load_recipe(None, [*GRPO, "rl.rewards=[{function: constraints}]"])
    with pytest.raises(LlmtuneError, match="row 0 constraint 0 has kind 'lowercse'. Did you mean"):
        check_reward_columns(recipe, {"train": rows})
    recipe = load_recipe(None, [*GRPO, "rl.rewards=[{function: exact_answer}]"])
    with pytest.raises(LlmtuneError, match="reads a 'answer' column, and the train prompts have none"):
        check_reward_columns(recipe, {"train": rows})
