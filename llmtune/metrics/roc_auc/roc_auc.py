"""ROC-AUC for binary tasks: how well the positive-class probability ranks positives above negatives."""

import sklearn.metrics

from llmtune.metrics.base import ScoreMetric


class RocAuc(ScoreMetric):
    """Area under the ROC curve of the positive-class probability."""

    def score(self, references, prediction_scores):
        if len(set(references)) < 2:
            return float("nan")  # undefined with one class present; reported as NaN, not an error
        return sklearn.metrics.roc_auc_score(references, prediction_scores)
