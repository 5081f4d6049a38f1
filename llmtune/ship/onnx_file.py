"""A trained classifier as an ONNX model for onnxruntime: exported with torch's dynamo exporter (any batch size
and length), saved beside its tokenizer and labels, and loaded back by `llmtune predict`.

torch's older TorchScript exporter was measured here giving MiniLM probabilities 1e-2 away from PyTorch's even at
the traced shape; the dynamo exporter agrees to 1e-7, so it is the one used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtune.errors import LlmtuneError
from llmtune.inference.classifier import Classifier
from llmtune.inference.onnx_classifier import MODEL_FILE, SETTINGS_FILE, load_onnx_classifier
from llmtune.run.files import write_json

logger = logging.getLogger(__name__)



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
