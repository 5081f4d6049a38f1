"""Benchmarks on a real checkpoint and the real benchmark files (../shared/data/benchmarks): llmtune's scores
equal lm-evaluation-harness's own path, a LoRA run scores unmerged as its merged copy does, and a run's
eval.benchmarks land in metrics.json and the report."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, SHARED_DATA, require_shared, run_main

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


def test_lora_sft_run_benchmarks_before_after_and_unmerged_as_merged(tmp_path):
    """SmolLM2 LoRA SFT on Alpaca with eval.benchmarks: scores before and after training in metrics.json, the
    report and the card; `llmtune eval RUN --tasks` on the run (adapter unmerged) equals its merged copy."""
    from llmtune import api, load_recipe

    source = require_shared(SHARED_DATA / "alpaca" / "alpaca_5000.json")
    rows = [r for r in json.loads(source.read_text()) if len(r["output"]) < 300][:48]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows))
    run_dir = tmp_path / "sft"
    metrics = api.train(load_recipe("recipes/smollm2_alpaca_lora.yaml", [
        "data.dataset=null", f"data.train_file={data}", "data.eval_file=null", "data.validation_fraction=0.25",
        "data.max_length=128", "training.max_steps=4", "training.batch_size=4", "training.gradient_accumulation=1",
        "training.learning_rate=5e-4", "lm.generation_prompts=[]", "eval.benchmarks=[arc_easy]",
        "eval.benchmark_limit=20", f"eval.benchmark_data_dir={BENCHMARKS}", f"output.dir={run_dir}"]))
    benchmarks = metrics["benchmarks"]
    (row,) = benchmarks["forgetting"]
    assert row["task"] == "arc_easy" and row["metric"] == "acc_norm" and row["interval_95"] > 0
    assert "Benchmarks (forgetting check)" in (run_dir / "report.html").read_text()

    result = run_main("eval", str(run_dir), "--tasks", "arc_easy", "--limit", "20", "--data-dir", str(BENCHMARKS),
                      "--log-samples", cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    unmerged = json.loads(result.stdout)
    assert unmerged["scores"]["arc_easy"] == benchmarks["after"]["arc_easy"]  # the saved run = the model in memory
    results_file = run_dir / "benchmarks" / unmerged["files"][0].split("/benchmarks/")[1]
    assert json.loads(results_file.read_text())["llmtune"]["settings"]["limit"] == 20
    samples = [json.loads(line) for line in (results_file.parent / f"{results_file.stem}-samples-arc_easy.jsonl")
               .read_text().splitlines()]
    assert len(samples) == 20

    merged_dir = tmp_path / "merged"
    api.merge(run_dir, merged_dir)
    merged = api.benchmark(merged_dir, ["arc_easy"], limit=20, data_dir=BENCHMARKS, log_samples=True,
                           out=tmp_path / "merged.json", precision=unmerged["precision"])  # the run's precision
    assert merged["scores"]["arc_easy"]["acc"] == unmerged["scores"]["arc_easy"]["acc"]
    assert merged["scores"]["arc_easy"]["acc_norm"] == unmerged["scores"]["arc_easy"]["acc_norm"]
    merged_samples = [json.loads(line) for line in (tmp_path / "merged-samples-arc_easy.jsonl").read_text().splitlines()]
    for ours, theirs in zip(samples, merged_samples):
        assert [r[0][0] for r in ours["resps"]] == pytest.approx([r[0][0] for r in theirs["resps"]], abs=1e-3)
