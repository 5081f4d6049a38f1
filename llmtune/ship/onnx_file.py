"""A trained classifier as an ONNX model for onnxruntime: exported with torch's dynamo exporter (any batch size
and length), saved beside its tokenizer and labels, and loaded back by `llmtune predict`.

torch's older TorchScript exporter was measured here giving MiniLM probabilities 1e-2 away from PyTorch's even at
the traced shape; the dynamo exporter agrees to 1e-7, so it is the one used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from llmtune.errors import LlmtuneError
from llmtune.files import read_json, write_json
from llmtune.tasks.classification_predict import Classifier

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
SETTINGS_FILE = "llmtune_onnx.json"  # labels, columns and lengths predict needs beside the tokenizer


class _LogitsOnly(torch.nn.Module):
    """The classifier as a function of its tokenizer's tensors returning logits (the exporter traces plain
    outputs, not a ModelOutput)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


def write_onnx(classifier: Classifier, folder: Path) -> None:
    """Export `classifier` (a full-precision model, adapters merged) with its tokenizer into `folder`."""
    tokenizer = classifier.tokenizer
    sample = tokenizer(["A short probe.", "A longer probe sentence, padded to the same length."],
                       padding=True, return_tensors="pt")
    names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in sample]
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(
        _LogitsOnly(classifier.model).eval(), (), str(folder / MODEL_FILE),
        kwargs={name: sample[name] for name in names}, input_names=names, output_names=["logits"],
        dynamic_shapes={name: {0: batch, 1: length} for name in names}, dynamo=True, external_data=False,
        verbose=False,
    )
    tokenizer.save_pretrained(folder)
    classifier.model.config.save_pretrained(folder)  # labels; tells `model_kind` this is a classifier
    write_json(folder / SETTINGS_FILE, {
        "labels": classifier.labels, "max_length": classifier.max_length, "columns": classifier.columns,
        "batch_size": classifier.batch_size, "inputs": names,
    })


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


def verify_onnx(folder: Path, classifier: Classifier, texts: list[str], pairs: list[str] | None = None,
                tolerance: float = 1e-4) -> dict[str, Any]:
    """Probabilities from onnxruntime against PyTorch's on `texts` (and `pairs`, for a pair classifier); raise
    if any differs by more than `tolerance`."""
    exported = load_onnx_classifier(folder)
    expected = classifier.probabilities(texts, pairs)
    got = exported.probabilities(texts, pairs)
    difference = float(np.abs(expected - got).max())
    if difference > tolerance:
        raise LlmtuneError(
            f"The ONNX model's probabilities differ from PyTorch's by up to {difference:.2e} on {len(texts)} probe "
            f"texts (allowed {tolerance:.0e}), so it was not kept."
        )
    agreement = float((expected.argmax(-1) == got.argmax(-1)).mean())
    return {"probe_texts": len(texts), "max_probability_diff": difference, "label_agreement": agreement}
