"""Precision, macro-averaged over classes by default (pass average= to change it)."""

import sklearn.metrics

from llmtune.metrics.base import LabelMetric


class Precision(LabelMetric):
    """Precision per class, macro-averaged by default."""

    def score(self, references, predictions, average):
        return sklearn.metrics.precision_score(references, predictions, average=average, zero_division=0)
