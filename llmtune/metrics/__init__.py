"""Evaluation metrics as `evaluate` modules that ship inside llmtune, so they load with no network.

Each folder holds one module script; `load_metric("f1")` hands it to `evaluate.load` by path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

METRICS_DIR = Path(__file__).resolve().parent
AVAILABLE_METRICS = ("accuracy", "f1", "precision", "recall", "roc_auc")


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load one of AVAILABLE_METRICS from the scripts bundled with llmtune (offline)."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name / f"{name}.py"))
