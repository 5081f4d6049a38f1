"""Benchmark a causal LM and keep the evidence: the scores, lm-eval's own results file with llmtune's provenance,
and the per-sample outputs on request. Used by `llmtune eval RUN --tasks ...` and by a run's `eval.benchmarks`
(before and after training, on the model in memory)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import time
from pathlib import Path
from typing import Any

from llmtune.errors import LlmtuneError
from llmtune.inference.loading import LanguageModel
from llmtune.measure.harness import (
    BenchmarkSettings,
    data_files,
    resolve_data_dir,
    run_benchmarks,
    write_results,
)

logger = logging.getLogger(__name__)

BENCHMARKS_DIR = "benchmarks"  # in a run directory: before.json, after.json, eval-<time>.json


def benchmark(lm: LanguageModel, settings: BenchmarkSettings, source: str, results_path: Path | None = None
              ) -> dict[str, Any]:
    """Score `lm` on the settings' tasks in its own precision; write the results file when `results_path` is set.
    Returns {"model", "precision", "tasks", "limit", "num_fewshot", "scores", "seconds", "files"}."""
    logger.info("Benchmarks %s on %s (%s)%s", ", ".join(settings.tasks), source, lm.precision,
                f", the first {settings.limit} items each" if settings.limit else "")
    was_training = lm.model.training
    lm.model.eval()
    try:
        with lm.computing():
            result = run_benchmarks(lm.model, lm.tokenizer, settings)
    finally:
        lm.model.train(was_training)
    files = write_results(results_path, result, provenance(lm, settings, source)) if results_path else []
    return {"model": source, "precision": lm.precision, "tasks": list(settings.tasks), "limit": settings.limit,
            "num_fewshot": settings.num_fewshot, "scores": result.scores, "seconds": round(result.seconds, 1),
            "files": [str(f) for f in files]}


def provenance(lm: LanguageModel, settings: BenchmarkSettings, source: str) -> dict[str, Any]:
    """What produced a score: the model as given, its precision, the settings, the data files' sha256, versions."""
    from llmtune.patches import in_use
    from llmtune.run.run_dir import library_versions

    data_dir = resolve_data_dir(settings.data_dir)
    return {
        "model": source, "precision": lm.precision, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {**dataclasses.asdict(settings), "data_dir": str(data_dir) if data_dir else None},
        "data_files": data_files(data_dir, settings.tasks) if data_dir else "lm-eval's Hub datasets",
        "versions": {**library_versions(), "lm_eval": importlib.metadata.version("lm_eval")},
        "patches": in_use(),  # e.g. ifeval_without_nltk_data: IFEval's tokenizers substituted offline
    }


def results_path_for(run: str | Path, out: str | Path | None) -> Path | None:
    """Where `llmtune eval --tasks` writes its results: --out, else the run directory's benchmarks/ folder for a
    run (a Hub id or a plain model folder gets no file unless asked)."""
    if out:
        return Path(out)
    folder = Path(str(run))
    if (folder / "run.json").is_file():
        return folder / BENCHMARKS_DIR / f"eval-{time.strftime('%Y%m%d-%H%M%S')}.json"
    return None


# --- a run's eval.benchmarks: before and after training, on the model in memory ---------------------------------


def recipe_settings(recipe: Any) -> BenchmarkSettings | None:
    """The recipe's eval.benchmark* keys as settings; None when it names no benchmark."""
    evaluation = recipe.eval
    if not evaluation.benchmarks:
        return None
    return BenchmarkSettings(list(evaluation.benchmarks), evaluation.benchmark_limit, evaluation.benchmark_num_fewshot,
                             evaluation.benchmark_batch_size, evaluation.benchmark_data_dir)


def check_model_is_whole(trainer: Any) -> None:
    """The benchmarks run on the main process's model: refuse launches that shard it (FSDP, ZeRO-3)."""
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    stage = getattr(getattr(state, "deepspeed_plugin", None), "zero_stage", 0)
    if state.distributed_type == DistributedType.FSDP or (
            state.distributed_type == DistributedType.DEEPSPEED and stage == 3):
        raise LlmtuneError(
            "eval.benchmarks scores the model on the main process, and this launch shards it across processes "
            "(FSDP or DeepSpeed ZeRO-3). Drop eval.benchmarks and benchmark the saved run afterwards: "
            "`llmtune eval RUN --tasks ...`."
        )


def benchmark_in_run(trainer: Any, recipe: Any, run_dir: Path, stage: str) -> dict[str, Any]:
    """Score the trainer's model (adapters on) in the run's precision; benchmarks/{stage}.json keeps the record."""
    from llmtune.run.precision import resolved_precision

    settings = recipe_settings(recipe)
    path = run_dir / BENCHMARKS_DIR / f"{stage}.json"
    lm = LanguageModel(trainer.model, trainer.processing_class, chat=False,
                       precision=resolved_precision(recipe.training.precision))
    return benchmark(lm, settings, f"{run_dir} ({stage} training)", path)


def saved_benchmarks(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """The scores a run recorded at `stage` (a resumed run's baseline from its first start), or None."""
    from llmtune.run.files import read_json

    path = run_dir / BENCHMARKS_DIR / f"{stage}.json"
    return {"scores": read_json(path)["scores"], "files": [str(path)]} if path.is_file() else None


def forgetting_metrics(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    """metrics.json's `benchmarks`: the scores before and after, and the forgetting check's rows."""
    from llmtune.measure.forgetting import compare

    rows = compare(before["scores"], after["scores"]) if before else []
    return {"before": before["scores"] if before else {}, "after": after["scores"], "forgetting": rows,
            "dropped": [r["task"] for r in rows if r["dropped"]]}
