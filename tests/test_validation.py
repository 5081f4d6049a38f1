"""Problems that used to pass `validate` and then fail late - after loading a model, at step 0, or as a library's
traceback - are caught up front, each as one paragraph naming the key or file, the value and the way out."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from llmtune.cli import main


def error_of(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return next(line for line in err.splitlines() if line.startswith("error: "))


@pytest.fixture()
def quick(tiny_bert, reviews_files, tmp_path):
    return ["recipes/quickstart.yaml", f"model.name={tiny_bert}", f"data.train_file={reviews_files['train']}",
            f"data.eval_file={reviews_files['eval']}", "data.test_file=null", f"output.dir={tmp_path / 'run'}",
            "training.max_steps=1"]


@pytest.mark.parametrize("command", ["validate", "train"])
def test_max_length_longer_than_the_models_positions(capsys, quick, command):
    message = error_of(capsys, command, *quick, "data.max_length=1000000000")
    assert "'data.max_length' is 1000000000" in message and "positions for 128 tokens" in message
    assert "data.max_length to 128 or less" in message


def test_max_length_longer_than_a_scratch_models_context(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("a b c\n" * 10)
    message = error_of(capsys, "validate", "recipes/tiny_gpt_shakespeare_scratch.yaml", "data.dataset=null",
                       "data.eval_split=null", f"data.train_file={text}", "data.max_length=512")
    assert "'data.max_length' is 512" in message and "scratch.context_length" in message


@pytest.mark.parametrize("command", ["validate", "train"])
@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_output_dir_that_cannot_be_written(capsys, quick, tmp_path, command, where):
    target = "/proc/llmtune-test/run" if where == "proc" else str(tmp_path / "a_file" / "run")
    (tmp_path / "a_file").write_text("not a folder")
    message = error_of(capsys, command, *quick, f"output.dir={target}")
    assert f"'output.dir' is '{target}'" in message
    assert ("is a file" if where == "under_a_file" else "no file can be created in '/proc'") in message


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "an empty file"),
    (b"PK\x03\x04 a zip file, not a model" * 4, "not b'GGUF'"),
    ("header", "reading them failed"),
    pytest.param("truncated", "truncated", marks=pytest.mark.slow),  # reads SmolLM2's 49k-token vocabulary
], ids=["empty", "garbage", "header-only", "truncated"])
def test_damaged_gguf_files(capsys, smollm2_gguf, tmp_path, monkeypatch, content, expected):
    monkeypatch.setenv("LLMTUNE_CACHE", str(tmp_path / "cache"))
    real = smollm2_gguf.read_bytes()
    data = {"header": real[:4096], "truncated": real[:3_000_000]}.get(content, content)
    bad = tmp_path / "model.gguf"
    bad.write_bytes(data)
    message = error_of(capsys, "validate", "recipes/smollm2_alpaca_lora.yaml", f"model.name={bad}",
                       "data.dataset=null", f"data.train_file={tmp_path / 'x.jsonl'}")
    assert f"'model.name' is '{bad}', which is not a usable GGUF checkpoint" in message and expected in message


def test_data_that_is_not_utf8_names_the_byte_and_how_to_convert(capsys, quick, tmp_path):
    latin = tmp_path / "reviews.tsv"
    latin.write_bytes("text\tlabel\nA caf\xe9 worth the trip\tpositive\n".encode("latin-1"))
    message = error_of(capsys, "validate", *quick, f"data.train_file={latin}")
    assert f"'data.train_file' is '{latin}', which is not UTF-8" in message
    assert "byte 0xe9 at byte offset 16" in message and "iconv -f latin1 -t utf-8" in message


def test_a_corrupt_jsonl_row_is_named(capsys, quick, tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "fine", "label": "positive"}\n{"text": "also fine", "label": "negative"}\n'
                   '{"text": "broken" "label": "negative"}\n')
    message = error_of(capsys, "validate", *quick, f"data.train_file={bad}")
    assert "not valid JSON at line 3, column 19" in message


def test_perplexity_file_that_is_not_utf8(capsys, tiny_llama, tmp_path):
    latin = tmp_path / "valid.txt"
    latin.write_bytes("Il \xe9tait une fois.\n".encode("latin-1"))
    message = error_of(capsys, "eval", tiny_llama, "--text-file", str(latin))
    assert "'--text-file'" in message and "byte 0xe9 at byte offset 3" in message and "iconv" in message


def test_commands_check_the_kind_of_run(capsys, tiny_llama, tmp_path):
    classifier_run = tmp_path / "cls"
    classifier_run.mkdir()
    (classifier_run / "run.json").write_text(json.dumps({"recipe": {"task": "classification"}}))
    for argv in (["generate", str(classifier_run), "--prompt", "hi"], ["chat", str(classifier_run)],
                 ["eval", str(classifier_run), "--text-file", __file__]):
        message = error_of(capsys, *argv)
        assert "is a classification run" in message and f"llmtune predict {classifier_run}" in message
    for argv in (["predict", tiny_llama, "--text", "hi"], ["eval", tiny_llama, "--data", __file__]):
        message = error_of(capsys, *argv)
        assert "is a causal language model" in message and f"llmtune generate {tiny_llama}" in message


def test_validation_fraction_that_leaves_a_part_empty(capsys, quick, tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "only row", "label": "positive"}])
    message = error_of(capsys, "validate", *quick, f"data.train_file={one}", "data.eval_file=null",
                       "data.validation_fraction=0.5")
    assert "'data.validation_fraction' is 0.5" in message and "both parts need at least one row" in message
