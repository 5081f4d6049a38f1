"""F1, macro-averaged over classes by default (pass average= to change it)."""

import sklearn.metrics

from llmtune.metrics.base import LabelMetric


class F1(LabelMetric):
    """F1 per class, macro-averaged by default."""

    def score(self, references, predictions, average):
        return sklearn.metrics.f1_score(references, predictions, average=average, zero_division=0)
