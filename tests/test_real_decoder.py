"""A real decoder (SmolLM2-135M-Instruct, installed as GGUF) as a classifier, and the GGUF cache."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmtune import load_recipe, train
from llmtune.models.sources import _installed_path, resolve_model

pytestmark = pytest.mark.slow  # trains or loads a real checkpoint on real data


def test_gguf_is_converted_once_and_the_cache_matches_the_gguf_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTUNE_CACHE", str(tmp_path / "cache"))
    gguf = _installed_path("smollm2-135m-instruct")
    first = resolve_model(str(gguf))
    weights = os.path.join(first.path, "model.safetensors")
    stamp = os.stat(weights).st_mtime_ns
    again = resolve_model("smollm2")  # the short name reaches the same file and the same cache entry
    assert again.path == first.path and os.stat(weights).st_mtime_ns == stamp

    cached = AutoModelForCausalLM.from_pretrained(first.path)
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(first.path)("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, direct(ids).logits)


def test_smollm2_with_a_classification_head_trains_with_lora(reviews_files, tmp_path):
    recipe = load_recipe("recipes/quickstart.yaml", [
        "model.name=smollm2-135m-instruct",
        f"data.train_file={reviews_files['train']}",
        f"data.eval_file={reviews_files['eval']}",
        f"data.test_file={reviews_files['test']}",
        "data.max_length=32",
        "method.type=lora",
        "training.max_steps=6",
        "training.batch_size=8",
        "training.learning_rate=5e-4",
        "eval.before_training=false",
        f"output.dir={tmp_path / 'run'}",
    ])
    metrics = train(recipe)
    assert metrics["train"]["global_step"] == 6 and metrics["train"]["weights_changed"] is True
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["pad_token_id"] is not None
    predictions = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 8
