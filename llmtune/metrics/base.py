"""Shared shape of llmtune's metric modules; the modules themselves stay a few lines each.

The base classes are abstract so that `evaluate.load`, which picks the first concrete metric class in a
module script, picks the module's own class and not these.
"""

from __future__ import annotations

import abc

import datasets
import evaluate


class LabelMetric(evaluate.Metric, abc.ABC):
    """Compares predicted label ids with reference label ids; averages over classes are macro averages."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.__doc__ or "",
            citation="",
            inputs_description="predictions: predicted label ids; references: true label ids.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average: str = "macro") -> dict[str, float]:
        return {self.name: float(self.score(references, predictions, average))}

    @abc.abstractmethod
    def score(self, references, predictions, average: str) -> float:
        """The metric value for these labels."""


class ScoreMetric(evaluate.Metric, abc.ABC):
    """Compares predicted scores (probability of the positive class) with binary reference labels."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.__doc__ or "",
            citation="",
            inputs_description="prediction_scores: probability of label 1; references: 0/1 labels.",
            features=datasets.Features(
                {"prediction_scores": datasets.Value("float64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, prediction_scores, references) -> dict[str, float]:
        return {self.name: float(self.score(references, prediction_scores))}

    @abc.abstractmethod
    def score(self, references, prediction_scores) -> float:
        """The metric value for these scores."""
