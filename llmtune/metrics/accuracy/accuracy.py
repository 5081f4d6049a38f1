"""Accuracy: the fraction of predictions equal to the reference label."""

import sklearn.metrics

from llmtune.metrics.base import LabelMetric


class Accuracy(LabelMetric):
    """Fraction of predictions equal to the reference label."""

    def score(self, references, predictions, average):
        return sklearn.metrics.accuracy_score(references, predictions)
