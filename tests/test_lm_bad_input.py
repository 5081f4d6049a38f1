"""Bad causal-LM data gets a clear error naming the row and the problem; over-long samples are counted."""

from __future__ import annotations

import json

import pytest
from conftest import NO_REPORT, write_jsonl

from llmtune.cli import main


def sft(capsys, model: str, data, tmp_path, *extra: str, command: str = "validate") -> tuple[int, str]:
    """`llmtune validate` (or train) of an SFT recipe on this data: the data checks run the same either way."""
    code = main([command, "recipes/smollm2_alpaca_lora.yaml", f"model.name={model}", "data.dataset=null",
                 f"data.train_file={data}", "data.eval_split=null", "data.validation_fraction=0", "data.format=auto",
                 "training.max_steps=1", f"output.dir={tmp_path / 'run'}", "lm.generation_prompts=[]", NO_REPORT, *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines[-1] if lines else ""


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("messages, message", [
    ([user("hi"), user("hello?")], "row 1: the conversation has no assistant turn"),
    ([user("hi"), user("again"), assistant("yes")], "row 1: roles are out of order (user -> user -> assistant)"),
    ([assistant("I start"), user("hi"), assistant("ok")], "roles are out of order"),
])
def test_bad_conversations_name_the_row_and_the_problem(capsys, tiny_llama, tmp_path, messages, message):
    good = {"messages": [user("fine"), assistant("yes")]}
    data = write_jsonl(tmp_path / "chat.jsonl", [good, {"messages": messages}])
    code, err = sft(capsys, tiny_llama, data, tmp_path)
    assert code == 2 and err.startswith("error:") and message in err, err


def test_conversations_with_an_empty_turn_are_dropped_and_counted(capsys, tiny_llama, tmp_path, caplog):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(6)]
    rows[3]["output"] = "   "  # as in the real Alpaca data (row 2335 of the shared 5k subset)
    code, _ = sft(capsys, tiny_llama, write_jsonl(tmp_path / "alpaca.jsonl", rows), tmp_path)
    assert code == 0
    assert "dropped 1 of 6 conversations with an empty turn (the first is row 3)" in caplog.text

    nothing = write_jsonl(tmp_path / "empty.jsonl", [{"instruction": "Say.", "input": "", "output": ""}])
    code, err = sft(capsys, tiny_llama, nothing, tmp_path, "output.dir=" + str(tmp_path / "run2"))
    assert code == 2 and "every conversation has an empty turn" in err, err


def test_template_that_cannot_mark_assistant_tokens_is_explained(capsys, tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [user("a"), assistant("b"), user("c"), assistant("d")]}])
    newest_first = ("{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant: {% endif %}")
    code, err = sft(capsys, tiny_llama, data, tmp_path, f"lm.chat_template={json.dumps(newest_first)}")
    assert code == 2 and "lm.loss_on=assistant needs a chat template" in err and "lm.loss_on=all" in err, err
    assert "lm.chat_template=chatml" in err


def test_columns_that_do_not_match_the_format(capsys, tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    code, err = sft(capsys, tiny_llama, data, tmp_path, "data.format=alpaca")
    assert code == 2 and "needs column 'instruction'" in err and "question, answer" in err and "data.columns" in err


def test_column_mapping_fixes_custom_names(capsys, tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(4)])
    code, _ = sft(capsys, tiny_llama, data, tmp_path, "data.format=alpaca",
                  "data.columns={instruction: question, output: answer}")
    assert code == 0


def test_over_long_samples_are_truncated_and_never_silently_all_masked(capsys, tiny_llama, tmp_path):
    long_prompt = {"messages": [user("word " * 200), assistant("short answer")]}
    fits = {"messages": [user("hi"), assistant("hello there")]}
    data = write_jsonl(tmp_path / "chat.jsonl", [long_prompt, fits, fits])
    code, err = sft(capsys, tiny_llama, data, tmp_path, "data.max_length=64", command="train")
    assert code == 0, err
    stats = json.loads((tmp_path / "run" / "run.json").read_text())["token_stats"]["train"]
    assert stats["samples"] == 3 and stats["truncated"] == 1 and stats["dropped_no_trained_tokens"] == 1

    only_long = write_jsonl(tmp_path / "long.jsonl", [long_prompt])
    code, err = sft(capsys, tiny_llama, only_long, tmp_path, "data.max_length=64", f"output.dir={tmp_path / 'r2'}")
    assert code == 2 and "lost all its trained tokens" in err and "Raise data.max_length" in err
