"""The classification recipe end to end on a tiny BERT: what a run leaves behind and how it can be used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import NO_REPORT
from transformers import AutoModelForSequenceClassification

from llmtune import build_trainer, load_recipe, train
from llmtune.cli import main


def recipe_for(tiny_bert: str, files: dict[str, Path], run_dir: Path, *extra: str):
    return load_recipe("recipes/quickstart.yaml", [
        f"model.name={tiny_bert}",
        f"data.train_file={files['train']}",
        f"data.eval_file={files['eval']}",
        f"data.test_file={files['test']}",
        f"output.dir={run_dir}",
        NO_REPORT,
        "training.epochs=2",
        "training.learning_rate=1e-3",
        *extra,
    ])


def test_full_run_leaves_model_records_metrics_and_predictions(tiny_bert, reviews_files, tmp_path):
    run_dir = tmp_path / "run"
    metrics = train(recipe_for(tiny_bert, reviews_files, run_dir))

    assert set(metrics) >= {"before", "train", "after"} and "accuracy" in metrics["after"]
    assert metrics["train"]["max_learning_rate"] > 0 and metrics["train"]["weights_changed"] is True  # not flagged
    assert json.loads((run_dir / "metrics.json").read_text())["after"] == metrics["after"]

    record = json.loads((run_dir / "run.json").read_text())
    assert record["recipe"]["model"]["name"] == tiny_bert
    assert record["versions"]["transformers"].startswith("5.")
    assert len(record["data"]["train_file"]["sha256"]) == 64
    assert record["labels"] == ["negative", "positive"]

    model = AutoModelForSequenceClassification.from_pretrained(run_dir)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8
    assert all(p["label"] in ("negative", "positive") for p in predictions)
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in predictions)
    assert "test" in metrics  # the test file has labels, so it is scored too
    assert not (run_dir / "report.html").exists() and not (run_dir / "plots").exists()  # output.report=false


def test_lora_run_saves_adapter_with_head_and_cli_predict_eval_agree(tiny_bert, reviews_files, tmp_path, capsys):
    run_dir = tmp_path / "lora"
    train(recipe_for(tiny_bert, reviews_files, run_dir, "method.type=lora", "method.target_modules=[query, value]"))
    from safetensors.torch import load_file

    weights = load_file(run_dir / "adapter_model.safetensors")
    assert any("lora_A" in k for k in weights) and any("classifier" in k for k in weights)
    assert not (run_dir / "model.safetensors").exists()

    capsys.readouterr()  # drop the training logs
    assert main(["predict", str(run_dir), "--text", "The toaster is superb.", "--text", "Awful."]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["text"] for x in lines] == ["The toaster is superb.", "Awful."]
    assert all(x["label"] in ("negative", "positive") for x in lines)

    assert main(["eval", str(run_dir), "--data", str(reviews_files["eval"])]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    saved = json.loads((run_dir / "metrics.json").read_text())["after"]
    assert evaluated["samples"] == 32
    assert evaluated["accuracy"] == pytest.approx(saved["accuracy"])  # same model, same data, same number


@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=pytest.mark.slow), "bf16"])
def test_llmtune_eval_reproduces_the_runs_own_evaluation_in_its_precision(tiny_bert, reviews_files, tmp_path, capsys,
                                                                          precision):
    """A bf16 run evaluates in bf16; run.json records it and `llmtune eval` scores the saved model the same way, so
    the numbers agree - on CPUs with and without native bf16 alike."""
    run_dir = tmp_path / precision
    train(recipe_for(tiny_bert, reviews_files, run_dir, f"training.precision={precision}", "data.test_file=null",
                     "training.epochs=1"))
    assert json.loads((run_dir / "run.json").read_text())["precision"] == {"training": precision,
                                                                           "evaluation": precision}
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--data", str(reviews_files["eval"])]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    saved = json.loads((run_dir / "metrics.json").read_text())["after"]
    assert evaluated["computed_in"] == precision
    for name in ("accuracy", "f1", "precision", "recall", "roc_auc"):
        assert evaluated[name] == pytest.approx(saved[name], abs=1e-6), name


@pytest.mark.slow  # an end-to-end run; the fast tier keeps one per feature
def test_dora_and_merged_save(tiny_bert, reviews_files, tmp_path):
    run_dir = tmp_path / "dora"
    train(recipe_for(tiny_bert, reviews_files, run_dir, "method.type=dora", "output.save=merged", "training.max_steps=3"))
    model = AutoModelForSequenceClassification.from_pretrained(run_dir)  # plain transformers, no peft
    assert model.config.id2label[1] == "positive"
    assert not (run_dir / "adapter_config.json").exists()


def test_sentence_pairs_and_integer_labels_and_validation_fraction(tiny_bert, tmp_path):
    rows = ["premise,hypothesis,label"] + [
        f"the {n} is red,the {n} is {'red' if i % 2 else 'blue'},{i % 2}" for i, n in enumerate(["car", "cup", "hat"] * 20)
    ]
    data = tmp_path / "pairs.csv"
    data.write_text("\n".join(rows) + "\n")
    recipe = load_recipe({
        "model": {"name": tiny_bert},
        "data": {"train_file": str(data), "text_column": "premise", "text_pair_column": "hypothesis",
                 "validation_fraction": 0.25},
        "training": {"max_steps": 3},
        "output": {"dir": str(tmp_path / "pairs-run"), "report": False},
    })
    metrics = train(recipe)
    assert metrics["after"]["accuracy"] in {i / 15 for i in range(16)}  # scored on all 15 held-out pairs
    record = json.loads((tmp_path / "pairs-run" / "run.json").read_text())
    assert record["labels"] == ["0", "1"] and record["data_sizes"] == {"train": 45, "eval": 15}


def test_python_api_builds_a_trainer_the_user_drives(tiny_bert, reviews_files, tmp_path):
    recipe = recipe_for(tiny_bert, reviews_files, tmp_path / "api", "training.max_steps=4")
    trainer = build_trainer(recipe)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert "eval_accuracy" in trainer.evaluate()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


@pytest.mark.slow  # an end-to-end run; the fast tier keeps one per feature
def test_early_stopping_stops_when_the_metric_stalls(tiny_bert, reviews_files, tmp_path):
    recipe = recipe_for(tiny_bert, reviews_files, tmp_path / "es", "training.learning_rate=1e-12",
                        "training.max_steps=40", "training.eval_every=2", "training.early_stopping_patience=2",
                        "training.metric_for_best=loss", "eval.before_training=false")
    metrics = train(recipe)
    assert metrics["train"]["global_step"] < 40


def test_dataset_folder_with_named_splits_and_a_wrong_split_name(tiny_bert, reviews_files, tmp_path):
    from datasets import DatasetDict, load_dataset

    from llmtune.errors import LlmtuneError

    folder = tmp_path / "reviews_dataset"
    DatasetDict({
        "train": load_dataset("json", data_files=str(reviews_files["train"]), split="train"),
        "validation": load_dataset("json", data_files=str(reviews_files["eval"]), split="train"),
    }).save_to_disk(str(folder))
    base = [f"model.name={tiny_bert}", "data.train_file=null", f"data.dataset={folder}", "data.eval_file=null",
            "data.test_file=null", f"output.dir={tmp_path / 'run'}", "training.max_steps=2", NO_REPORT]
    metrics = train(load_recipe("recipes/quickstart.yaml", [*base, "data.eval_split=validation"]))
    assert "accuracy" in metrics["after"]
    with pytest.raises(LlmtuneError, match=r"'data.eval_split' is 'valid'.*Did you mean \"validation\".*train, validation"):
        train(load_recipe("recipes/quickstart.yaml", [*base, "data.eval_split=valid", f"output.dir={tmp_path / 'r2'}"]))
