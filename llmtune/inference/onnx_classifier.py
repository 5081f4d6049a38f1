"""A classifier exported by `llmtune export --format onnx`, loaded back for `llmtune predict` / `eval` / `serve`:
an onnxruntime session behind the same `Classifier` the PyTorch model uses (ship/onnx_file.py writes the folder)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from llmtune.errors import LlmtuneError
from llmtune.inference.classifier import Classifier
from llmtune.run.files import read_json

MODEL_FILE = "model.onnx"
SETTINGS_FILE = "llmtune_onnx.json"  # labels, columns and lengths predict needs beside the tokenizer


class OnnxModel:
    """An onnxruntime session that answers `model(**batch).logits` the way the PyTorch classifier does."""

    device = torch.device("cpu")

    def __init__(self, path: Path, inputs: list[str]):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initializers are noise to a user
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = inputs

    def __call__(self, **batch: torch.Tensor) -> Any:
        feed = {name: batch[name].numpy() for name in self.inputs}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(["logits"], feed)[0]))


def load_onnx_classifier(folder: Path) -> Classifier:
    """A Classifier backed by onnxruntime, from a folder `write_onnx` wrote."""
    from transformers import AutoTokenizer

    if not (folder / SETTINGS_FILE).is_file():
        raise LlmtuneError(f"'{folder}' holds {MODEL_FILE} but no {SETTINGS_FILE}: it was not written by "
                           "`llmtune export --format onnx`, so its labels and inputs are unknown.")
    settings = read_json(folder / SETTINGS_FILE)
    return Classifier(
        OnnxModel(folder / MODEL_FILE, settings["inputs"]), AutoTokenizer.from_pretrained(folder),
        settings["labels"], settings["max_length"], settings["columns"], "fp32", settings["batch_size"],
    )
