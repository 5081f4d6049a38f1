"""Benchmarks on a real checkpoint and the real benchmark files (../shared/data/benchmarks): llmtune's scores
equal lm-evaluation-harness's own loading and scoring. A real LoRA run's eval.benchmarks (before / after, unmerged
= merged) are checked with the SFT run of tests/test_real_smollm2_sft.py."""

from __future__ import annotations

import pytest
from conftest import SHARED_DATA, require_shared

pytestmark = pytest.mark.slow  # a real checkpoint on real benchmark files

BENCHMARKS = SHARED_DATA / "benchmarks"


def test_smollm2_scores_equal_lm_evals_own_loading_and_scoring(smollm2_path):
    """lm-eval loads the checkpoint itself (its `hf` model from the folder) on the same task files: per-task
    acc and acc_norm on 20 items of ARC-Easy, PIQA and HellaSwag equal llmtune's."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from llmtune import api
    from llmtune.measure.harness import TASK_DIR, scores

    require_shared(BENCHMARKS / "arc_easy" / "ARC-Easy-Test.jsonl")
    tasks = ["arc_easy", "piqa", "hellaswag"]
    ours = api.benchmark("smollm2-135m-instruct", tasks, limit=20, batch_size=16, data_dir=BENCHMARKS)
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={"data_dir": str(BENCHMARKS)})
    theirs = scores(simple_evaluate(model="hf", model_args={"pretrained": smollm2_path, "dtype": "float32",
                                                            "device": "cpu"},
                                    tasks=tasks, limit=20, batch_size=16, task_manager=manager, log_samples=False))
    assert ours["precision"] == "fp32" and ours["limit"] == 20
    for task in tasks:
        for metric in ("acc", "acc_norm"):
            assert ours["scores"][task][metric] == theirs[task][metric], (task, metric)
    assert ours["scores"]["arc_easy"]["acc_norm"] > 0.3  # above chance (0.25): the model reads the questions
