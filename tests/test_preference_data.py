"""Preference data: every layout read into prompt / chosen / rejected messages (or kto's prompt / completion /
label), on real HH-RLHF rows and on small hand-made files; unusable rows dropped and counted; recipe rules."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from datasets import Dataset

from llmtune.config.loader import load_recipe
from llmtune.config.schema import DataConfig
from llmtune.data.preference import (
    detect_layout,
    drop_unfit,
    load_preference_splits,
    to_pairs,
    to_unpaired,
)
from llmtune.errors import LlmtuneError

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "preference" / "hh-rlhf-harmless-base-test.jsonl.gz"


def hh_rows(n: int) -> list[dict]:
    with gzip.open(HH, "rt") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


def words(messages: list[dict]) -> int:  # a stand-in token count: one token per word, plus one per turn
    return sum(len(m["content"].split()) + 1 for m in messages)


def test_hh_transcripts_split_into_the_shared_prompt_and_the_two_last_replies():
    rows = hh_rows(60)
    pairs, dropped = to_pairs(Dataset.from_list(rows), "transcript_pairs", {}, None, "hh")
    assert len(pairs) + sum(dropped.values()) == 60 and len(pairs) >= 55
    for pair in pairs:
        assert [m["role"] for m in pair["chosen"]] == ["assistant"] == [m["role"] for m in pair["rejected"]]
        assert pair["prompt"][-1]["role"] == "user"
        assert pair["chosen"][0]["content"] != pair["rejected"][0]["content"]
    first = pairs[0]  # 3 Human and 3 Assistant turns: the prompt is 5 of them, ending with the third question
    assert [m["role"] for m in first["prompt"]] == ["user", "assistant"] * 2 + ["user"]
    assert first["prompt"][0]["content"] == "what are some pranks with a pen i can do?"
    assert first["prompt"][2]["content"] == "yep"
    assert first["prompt"][4]["content"] == "okay some of these do not have anything to do with pens"
    assert rows[0]["chosen"].endswith(first["chosen"][0]["content"])
    assert rows[0]["rejected"].endswith(first["rejected"][0]["content"])


def test_hh_fixed_split_holds_out_every_fifth_pair():
    data = DataConfig(train_file=str(HH), holdout_every=5, max_length=100_000)
    splits, layout, dropped = load_preference_splits(data, 0, True, words, None)
    assert layout == "transcript_pairs"
    assert len(splits["train"]) + sum(dropped["train"].values()) == 1850
    assert len(splits["eval"]) + sum(dropped["eval"].values()) == 462
    fifth = hh_rows(5)[4]  # line index 4 is the first held-out pair
    assert fifth["chosen"].endswith(splits["eval"][0]["chosen"][0]["content"])


@pytest.mark.parametrize("layout_rows, layout", [
    ([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}], "prompt_pairs"),
    ([{"prompt": [{"role": "user", "content": "2+2?"}],
       "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],  # repeats the prompt
       "rejected": [{"role": "assistant", "content": "5"}]}], "prompt_pairs"),
    ([{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
       "chosen": "4", "rejected": "5"}], "messages_pairs"),
    ([{"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
       "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}], "transcript_pairs"),
])
def test_every_paired_layout_reads_to_the_same_pair(layout_rows, layout):
    rows = Dataset.from_list(layout_rows)
    assert detect_layout(rows.column_names, {}, True, "x") == layout
    pairs, _ = to_pairs(rows, layout, {}, None, "x")
    pair = pairs[0]
    assert pair["prompt"][-1] == {"role": "user", "content": "2+2?"}
    assert pair["chosen"] == [{"role": "assistant", "content": "4"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "5"}]


def test_unusable_pairs_are_dropped_and_counted_and_an_all_dropped_file_is_an_error():
    rows = Dataset.from_list([
        {"prompt": "a", "chosen": "same", "rejected": "same"},
        {"prompt": "b", "chosen": " ", "rejected": "no"},
        {"prompt": "c", "chosen": "yes", "rejected": "no"},
    ])
    pairs, dropped = to_pairs(rows, "prompt_pairs", {}, None, "pairs.jsonl")
    assert len(pairs) == 1 and dropped == {"identical replies": 1, "empty reply": 1}
    with pytest.raises(LlmtuneError, match=r"pairs\.jsonl: every one of its 2 rows was dropped"):
        to_pairs(rows.select([0, 1]), "prompt_pairs", {}, None, "pairs.jsonl")


def test_missing_columns_name_the_data_and_suggest_the_column():
    expected = r"train\.jsonl has columns 'prompt', 'chosen', 'rejcted'.*no column 'rejected' \(Did you mean \"rejcted\"\?\)"
    with pytest.raises(LlmtuneError, match=expected):
        detect_layout(["prompt", "chosen", "rejcted"], {}, True, "train.jsonl")


def test_a_csv_header_with_spaces_is_named_as_the_problem(tmp_path):
    """'prompt, chosen, rejected' as a CSV header gives columns ' chosen' and ' rejected': the message must not read
    'has columns chosen, rejected, but ... needs chosen and rejected'."""
    from datasets import load_dataset

    path = tmp_path / "pairs.csv"
    path.write_text("prompt, chosen, rejected\n2+2?, 4, 5\n")
    columns = load_dataset("csv", data_files=str(path), split="train").column_names
    with pytest.raises(LlmtuneError) as caught:
        detect_layout(columns, {}, True, "pairs.csv")
    message = str(caught.value)
    assert "pairs.csv has columns 'prompt', ' chosen', ' rejected'" in message
    assert "' chosen' has a space before or after its name" in message and "' rejected' has a space" in message
    assert "data.columns={chosen: ' chosen', rejected: ' rejected'}" in message


def test_a_mapping_to_absent_columns_names_the_mapping_not_the_standard_names():
    with pytest.raises(LlmtuneError) as caught:
        detect_layout(["chosen", "rejected"], {"chosen": "good", "rejected": "bad"}, True, "train.jsonl")
    message = str(caught.value)
    assert "train.jsonl has columns 'chosen', 'rejected'" in message
    assert "data.columns maps chosen to 'good' and rejected to 'bad', but the data has no such column" in message
    assert "needs columns 'good' and 'bad' (chosen and rejected, as data.columns names them)" in message
    assert "remove those entries from data.columns" in message


def test_a_case_difference_is_named_and_kto_names_the_missing_label():
    with pytest.raises(LlmtuneError, match=r"no column 'chosen' \('Chosen' differs only in case"):
        detect_layout(["prompt", "Chosen", "rejected"], {}, True, "train.jsonl")
    with pytest.raises(LlmtuneError, match=r"has columns 'prompt', 'completion'.*no column 'label'"):
        detect_layout(["prompt", "completion"], {}, False, "feedback.jsonl")


def test_columns_can_be_mapped():
    rows = Dataset.from_list([{"q": "2+2?", "good": "4", "bad": "5"}])
    mapping = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    layout = detect_layout(rows.column_names, mapping, True, "x")
    pairs, _ = to_pairs(rows, layout, mapping, None, "x")
    assert pairs[0]["chosen"][0]["content"] == "4"


def test_kto_reads_labels_and_unpairs_pairs():
    for labels in ([True, False], ["true", "false"], [1, 0]):  # a CSV file's labels arrive as text or numbers
        rows = Dataset.from_list([{"prompt": "a", "completion": "good", "label": labels[0]},
                                  {"prompt": "b", "completion": "bad", "label": labels[1]}])
        layout = detect_layout(rows.column_names, {}, False, "x")
        assert layout == "unpaired"
        unpaired, _ = to_unpaired(rows, layout, {}, None, "x")
        assert unpaired["label"] == [True, False]
    with pytest.raises(LlmtuneError, match=r"feedback\.jsonl, row 0: 'label' is 'maybe'"):
        to_unpaired(Dataset.from_list([{"prompt": "a", "completion": "c", "label": "maybe"}]), "unpaired", {}, None,
                    "feedback.jsonl")
    pairs = Dataset.from_list([{"prompt": "p", "chosen": "yes", "rejected": "no"}])
    unpaired, _ = to_unpaired(pairs, "prompt_pairs", {}, None, "x")
    assert sorted((r["completion"][0]["content"], r["label"]) for r in unpaired) == [("no", False), ("yes", True)]
    with pytest.raises(LlmtuneError, match="prompt/completion/label"):
        detect_layout(["prompt", "completion"], {}, False, "feedback.jsonl")


def test_long_prompts_lose_their_oldest_turns_and_hopeless_ones_are_dropped():
    turns = [{"role": r, "content": "word " * 10} for r in ("user", "assistant", "user", "assistant", "user")]
    rows = Dataset.from_list([
        {"prompt": turns, "chosen": [{"role": "assistant", "content": "x"}]},
        {"prompt": [{"role": "user", "content": "word " * 50}], "chosen": [{"role": "assistant", "content": "x"}]},
    ])
    kept, dropped = drop_unfit(rows, words, max_length=40, max_prompt_length=35, where="x")
    assert dropped == {"prompt leaves no room for a reply": 1}
    assert kept[0]["prompt"] == turns[2:]  # 55 tokens > 35: the oldest exchange goes; 33 <= 35 stays


@pytest.mark.parametrize("override, message", [
    ("pref.beta=0", r"'pref.beta' is 0.0; it must be a positive"),
    ("pref.loss=sigmod", r"'pref.loss' names 'sigmod'.*Did you mean \"sigmoid\""),
    ("pref.loss_weights=[1,2]", r"not a list of losses"),
    ("pref.loss=[sigmoid,sft] pref.loss_weights=[1]", r"1 weights for 2 losses"),
    ("pref.loss=sft", r"only 'sft'"),
    ("pref.max_prompt_length=512", r"below data.max_length"),
    ("task=kto training.batch_size=1", r"kto estimates its KL term"),
])
def test_preference_rules_name_the_key_and_the_way_out(override, message):
    base = ["task=dpo", "model.name=smollm2", "data.train_file=x.jsonl"]
    with pytest.raises(LlmtuneError, match=message):
        load_recipe(None, [*base, *override.split()])


def test_reference_free_tasks_refuse_a_reference_model():
    with pytest.raises(LlmtuneError, match=r"'pref.reference'.*task orpo uses no reference model"):
        load_recipe(None, ["task=orpo", "model.name=smollm2", "data.train_file=x.jsonl", "pref.reference=other"])
    recipe = load_recipe(None, ["task=kto", "model.name=smollm2", "data.train_file=x.jsonl"])
    assert recipe.pref.loss is None  # kto's own loss


def test_a_preference_task_on_an_encoder_names_the_model_and_reward(tiny_bert):
    from llmtune.tasks.preference import check_decoder

    recipe = load_recipe(None, ["task=dpo", f"model.name={tiny_bert}", "data.train_file=x.jsonl"])
    with pytest.raises(LlmtuneError, match=r"a bert model, but task dpo tunes a decoder.*task=reward"):
        check_decoder(tiny_bert, recipe)


def test_real_pairs_read_the_same_in_every_layout():
    """Real HH pairs rewritten in each layout (strings, message lists, messages + replies, message transcripts)
    read to exactly the pairs of the original transcripts."""
    rows = hh_rows(20)
    reference, _ = to_pairs(Dataset.from_list(rows), "transcript_pairs", {}, None, "hh")
    pairs = list(reference)
    layouts = {
        "prompt_pairs": [{"prompt": p["prompt"], "chosen": p["chosen"][0]["content"],
                          "rejected": p["rejected"][0]["content"]} for p in pairs],
        "messages_pairs": [{"messages": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs],
        "transcript_pairs": [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]}
                             for p in pairs],
    }
    for layout, written in layouts.items():
        data = Dataset.from_list(written)
        assert detect_layout(data.column_names, {}, True, "x") == layout
        read, dropped = to_pairs(data, layout, {}, None, "x")
        assert not dropped and list(read) == pairs, layout
    unpaired, _ = to_unpaired(Dataset.from_list(layouts["prompt_pairs"]), "prompt_pairs", {}, None, "x")
    assert len(unpaired) == 2 * len(pairs) and sum(unpaired["label"]) == len(pairs)


def test_kto_rows_with_an_empty_prompt_are_dropped_and_counted_and_bad_messages_name_the_row():
    rows = Dataset.from_list([{"prompt": " ", "completion": "c", "label": True},
                              {"prompt": "p", "completion": "c", "label": False}])
    kept, dropped = to_unpaired(rows, "unpaired", {}, None, "feedback.jsonl")
    assert len(kept) == 1 and dropped == {"empty prompt": 1}
    bad = Dataset.from_list([{"prompt": "p", "completion": ["not a message"], "label": True}])
    with pytest.raises(LlmtuneError, match=r"feedback\.jsonl, row 0: the reply is list"):
        to_unpaired(bad, "unpaired", {}, None, "feedback.jsonl")


def test_accuracy_counts_a_tie_as_half_and_otherwise_keeps_trls_number():
    from llmtune.tasks.preference_trainers import summarize

    metrics = summarize("dpo")
    tied = {"eval_loss": 0.69, "eval_rewards/accuracies": 0.0, "eval_rewards/margins": 0.0}
    assert metrics(tied, "eval_before_")["accuracy"] == 0.5  # every margin 0: every pair tied
    lost = {"eval_rewards/accuracies": 0.0, "eval_rewards/margins": -0.2}
    assert metrics(lost, "eval_")["accuracy"] == 0.0
    won = {"eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.1}
    assert metrics(won, "eval_") == {"accuracy": 0.75, "margin": 0.1}
