"""Bad input gets a one-paragraph error naming the field, the value and what is valid - and nothing is lost."""

from __future__ import annotations

import json

import pytest

from llmtune.cli import main


def train(capsys, *args: str) -> tuple[int, str]:
    code = main(["train", *args])
    err = capsys.readouterr().err
    return code, err


@pytest.fixture()
def base_args(tiny_bert, reviews_files, tmp_path):
    return [
        "recipes/quickstart.yaml",
        f"model.name={tiny_bert}",
        f"data.train_file={reviews_files['train']}",
        f"data.eval_file={reviews_files['eval']}",
        "data.test_file=null",
        f"output.dir={tmp_path / 'run'}",
        "training.max_steps=2",
    ]


def assert_clean_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]  # progress bars may come before it; the error is one paragraph
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_unknown_key_on_the_command_line(capsys, base_args):
    assert_clean_error(*train(capsys, *base_args, "data.txt_column=text"), "data.txt_column", 'Did you mean "text_column"')


def test_wrong_value_type(capsys, base_args):
    assert_clean_error(*train(capsys, *base_args, "training.epochs=many"), "'training.epochs' is 'many'", "a number")


def test_data_path_that_does_not_exist(capsys, base_args, tmp_path):
    missing = tmp_path / "no_such.jsonl"
    assert_clean_error(*train(capsys, *base_args, f"data.train_file={missing}"), "'data.train_file'", str(missing),
                       "does not exist")


def test_missing_text_column_lists_the_columns(capsys, base_args):
    assert_clean_error(*train(capsys, *base_args, "data.text_column=review"), "'data.text_column' is 'review'",
                       "Its columns are: text, label")


def test_missing_label_column(capsys, base_args):
    assert_clean_error(*train(capsys, *base_args, "data.label_column=stars"), "'data.label_column' is 'stars'",
                       "text, label")


def test_empty_split(capsys, base_args, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    assert_clean_error(*train(capsys, *base_args, f"data.eval_file={empty}"), "'data.eval_file'", str(empty),
                       "split would be empty")


def test_eval_labels_never_seen_in_training(capsys, base_args, reviews_files, tmp_path):
    rows = [json.loads(line) for line in reviews_files["eval"].read_text().splitlines()]
    rows[0]["label"] = "neutral"
    bad = tmp_path / "eval_neutral.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert_clean_error(*train(capsys, *base_args, f"data.eval_file={bad}"), "never seen in training: neutral",
                       "negative, positive")


def test_model_name_not_local_and_not_resolvable_offline(capsys, base_args):
    assert_clean_error(*train(capsys, *base_args, "model.name=some-org/not-downloaded-model"),
                       "'model.name' is 'some-org/not-downloaded-model'", "HF_HUB_OFFLINE", "hf download",
                       "set model.name to that folder")


def test_model_path_that_does_not_exist(capsys, base_args, tmp_path):
    assert_clean_error(*train(capsys, *base_args, f"model.name={tmp_path / 'models' / 'bert'}"),
                       "no file or folder exists there")


def test_output_dir_holding_a_run_is_refused_and_untouched(capsys, base_args, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-7").mkdir(parents=True)
    (run / "run.json").write_text('{"old": true}')
    (run / "checkpoint-7" / "model.safetensors").write_bytes(b"weights")
    code, err = train(capsys, *base_args)
    assert_clean_error(code, err, str(run), "already holds a previous run", "--resume", "output.overwrite=true")
    assert (run / "run.json").read_text() == '{"old": true}'
    assert (run / "checkpoint-7" / "model.safetensors").read_bytes() == b"weights"


def test_resume_where_there_is_no_run(capsys, base_args):
    assert_clean_error(*train(capsys, *base_args, "--resume"), "holds no llmtune run", "without --resume")


@pytest.mark.slow  # two training runs
def test_resume_of_a_run_that_died_before_its_first_checkpoint_gives_advice_that_works(capsys, base_args, tmp_path):
    """A run that crashed before any checkpoint was whole: --resume says so and what to do; doing it works."""
    run, args = tmp_path / "run", [*base_args, "training.save_every=no"]
    assert main(["train", *args]) == 0  # a run record, no checkpoint
    (run / "metrics.json").unlink()  # a run that died never wrote its metrics
    (run / "checkpoint-1").mkdir()
    (run / "checkpoint-1" / "optimizer.pt").write_bytes(b"half")  # what a kill during the first save leaves
    code, err = train(capsys, *args, "--resume")
    assert_clean_error(code, err, "no complete checkpoint", "checkpoint-1: the save stopped before the end",
                       "without --resume", "output.overwrite=true")
    assert (run / "checkpoint-1" / "optimizer.pt").exists()  # nothing was touched
    assert main(["train", *args, "output.overwrite=true"]) == 0


def test_fp16_on_cpu_is_refused(capsys, base_args):
    assert_clean_error(*train(capsys, *base_args, "training.precision=fp16"), "fp16", "bf16")


def test_validate_reports_a_good_recipe_and_a_bad_one(capsys, base_args):
    assert main(["validate", *base_args[:5]]) == 0
    out = capsys.readouterr().out
    assert '"labels": [\n    "negative",\n    "positive"\n  ]' in out and "recipe OK" in out
    assert_clean_error(main(["validate", *base_args[:5], "data.label_column=y"]), capsys.readouterr().err,
                       "'data.label_column' is 'y'")
