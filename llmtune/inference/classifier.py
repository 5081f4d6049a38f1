"""Use a trained classifier: load a run (full model or adapter) and predict or evaluate on new text - in the
precision and batch size the run evaluated with, so `llmtune eval` reproduces the run's own numbers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from llmtune.errors import LlmtuneError
from llmtune.inference.trained import load_trained
from llmtune.metrics import MetricComputer, softmax
from llmtune.run.precision import evaluation_precision


@dataclass
class Classifier:
    model: torch.nn.Module
    tokenizer: Any
    labels: list[str]
    max_length: int
    columns: dict[str, str | None]  # text / text_pair / label column names the run was trained with
    precision: str = "fp32"  # the run's evaluation precision (run.json), or what the user asked for
    batch_size: int = 32  # the run's evaluation batch size: the same batches give the same numbers

    @classmethod
    def load(cls, path: str | Path, precision: str = "auto", full_precision: bool = False) -> Classifier:
        """Load a run directory or one of its checkpoint-N folders. precision 'auto' is the run's own;
        `full_precision` loads a quantized (QLoRA) base in float32, as merging needs."""
        if not Path(path).is_dir():
            raise LlmtuneError(f"'{path}' is not a folder. Give a run directory or one of its checkpoint-N folders.")
        model, tokenizer, record = load_trained(path, AutoModelForSequenceClassification, full_precision=full_precision)
        recipe = record.get("recipe") or {}
        data, training = recipe.get("data", {}), recipe.get("training", {})
        columns = {
            "text": data.get("text_column", "text"),
            "text_pair": data.get("text_pair_column"),
            "label": data.get("label_column", "label"),
        }
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if precision == "auto":
            precision = record.get("precision", {}).get("evaluation", "fp32")
        batch_size = training.get("eval_batch_size") or 2 * training.get("batch_size", 16)
        return cls(model, tokenizer, labels, data.get("max_length", 512), columns, precision, batch_size)

    def probabilities(self, texts: list[str], pairs: list[str] | None = None, batch_size: int | None = None
                      ) -> np.ndarray:
        """Class probabilities, one row per text (or text pair), in label order."""
        return softmax(self.logits(texts, pairs, batch_size))

    @torch.inference_mode()
    def logits(self, texts: list[str], pairs: list[str] | None = None, batch_size: int | None = None) -> np.ndarray:
        """Raw scores (float32), one row per text (or text pair), in label order."""
        batch_size = batch_size or self.batch_size
        rows = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            pair = pairs[start : start + batch_size] if pairs else None
            batch = self.tokenizer(
                chunk, pair, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
            )
            with evaluation_precision(self.precision, self.model.device.type):
                logits = self.model(**batch).logits
            rows.append(logits.float().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, len(self.labels)), dtype=np.float32)

    def predict(self, texts: list[str], pairs: list[str] | None = None, batch_size: int | None = None
                ) -> list[dict[str, Any]]:
        """One {'label', 'probabilities'} record per text (or text pair)."""
        return [
            {"label": self.labels[int(probs.argmax())],
             "probabilities": {name: round(float(p), 6) for name, p in zip(self.labels, probs)}}
            for probs in self.probabilities(texts, pairs, batch_size)
        ]


def evaluate_file(
    classifier: Classifier, rows: Any, metrics: list[str], batch_size: int | None = None
) -> dict[str, float]:
    """Metrics of a trained classifier on labelled rows (a datasets.Dataset)."""
    from llmtune.data.loading import require_columns

    columns = classifier.columns
    require_columns(rows, "eval", {"--text-column": columns["text"], "--text-pair-column": columns["text_pair"],
                                   "--label-column": columns["label"]})
    label2id = {name: i for i, name in enumerate(classifier.labels)}
    references = []
    for value in rows[columns["label"]]:
        if str(value) in label2id:
            references.append(label2id[str(value)])
        elif isinstance(value, int) and 0 <= value < len(classifier.labels):
            references.append(value)  # integer labels of a run trained with data.label_names
        else:
            raise LlmtuneError(
                f"The eval data has label {value!r}, which the model never saw in training. "
                f"Its labels are: {', '.join(classifier.labels)}."
            )
    pairs = rows[columns["text_pair"]] if columns["text_pair"] else None
    probabilities = classifier.probabilities(rows[columns["text"]], pairs, batch_size)
    scores = MetricComputer(metrics, len(classifier.labels)).score(probabilities, np.array(references))
    return {"samples": len(references), "computed_in": classifier.precision, **scores}
