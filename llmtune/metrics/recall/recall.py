"""Recall, macro-averaged over classes by default (pass average= to change it)."""

import sklearn.metrics

from llmtune.metrics.base import LabelMetric


class Recall(LabelMetric):
    """Recall per class, macro-averaged by default."""

    def score(self, references, predictions, average):
        return sklearn.metrics.recall_score(references, predictions, average=average, zero_division=0)
