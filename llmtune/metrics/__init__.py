"""Evaluation metrics as `evaluate` modules that ship inside llmtune, so they load with no network.

Each folder holds one module script; `load_metric("f1")` hands it to `evaluate.load` by path. `MetricComputer`
turns classifier logits into the recipe's metrics, for training's evaluations and for `llmtune eval` alike.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import evaluate
    import numpy as np

logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load one of the classification metrics (config/vocab.py) from the scripts bundled with llmtune (offline)."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name / f"{name}.py"))


def softmax(logits: Any) -> np.ndarray:
    import torch

    return torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=-1).numpy()


class MetricComputer:
    """compute_metrics for the Trainer: logits -> probabilities -> the recipe's metrics."""

    def __init__(self, names: list[str], num_labels: int):
        if "roc_auc" in names and num_labels != 2:
            logger.info("roc_auc is defined here for binary tasks only; skipping it for %d labels.", num_labels)
        self.names = [n for n in names if n != "roc_auc" or num_labels == 2]
        self.modules = {name: load_metric(name) for name in self.names}
        self.last: tuple[np.ndarray, np.ndarray] | None = None  # (predicted, references) of the latest call

    def __call__(self, prediction: Any) -> dict[str, float]:
        return self.score(softmax(prediction.predictions), prediction.label_ids)

    def score(self, probabilities: np.ndarray, references: np.ndarray) -> dict[str, float]:
        predicted = probabilities.argmax(-1)
        self.last = (predicted, references)
        results: dict[str, float] = {}
        for name, module in self.modules.items():
            if name == "roc_auc":
                results.update(module.compute(prediction_scores=probabilities[:, 1], references=references))
            else:
                results.update(module.compute(predictions=predicted, references=references))
        return results


def class_report(labels: list[str], predicted: np.ndarray, references: np.ndarray) -> dict[str, Any]:
    """Confusion matrix (rows: true label, columns: predicted) and precision / recall / F1 / support per class."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(labels)))
    matrix = confusion_matrix(references, predicted, labels=ids)
    precision, recall, f1, support = precision_recall_fscore_support(references, predicted, labels=ids,
                                                                     zero_division=0)
    per_class = {label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                         "support": int(support[i])} for i, label in enumerate(labels)}
    return {"labels": labels, "confusion_matrix": matrix.tolist(), "per_class": per_class}
