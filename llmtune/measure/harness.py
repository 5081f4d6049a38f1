"""Standard benchmarks through lm-evaluation-harness, on a model exactly as llmtune loaded it.

The model is handed to lm-eval as an object (its `HFLM` wrapper, scoring each multiple-choice question once:
scorer.py), so a LoRA/DoRA run is scored as an adapter on its - possibly 4-bit - base, unmerged, in the run's
evaluation precision. Tasks come from lm_eval_tasks/ (the
benchmark files in their published layouts, in a folder named by `data_dir`) or, for any other name, from
lm-eval's own task registry (which downloads its data from the Hub).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.errors import LlmtuneError, did_you_mean
from llmtune.run.files import sha256, write_json, write_text

logger = logging.getLogger(__name__)

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"
DATA_DIR_VARIABLE = "LLMTUNE_BENCHMARK_DATA"


def _offline_task_names() -> dict[str, str]:
    """Every task and group name lm_eval_tasks/ defines -> the benchmark (a key of benchmark_files.FILES) it reads."""
    names = {path.stem: path.stem for path in TASK_DIR.glob("*.yaml")}
    for path in (TASK_DIR / "mmlu").glob("*.yaml"):
        names[path.stem.lstrip("_")] = "mmlu"
    return names


OFFLINE_TASKS = _offline_task_names()


@dataclass
class BenchmarkSettings:
    """What to evaluate and how (the `eval.benchmark*` recipe keys and `llmtune eval --tasks` options)."""

    tasks: list[str]
    limit: int | None = None  # items per task (the first N), None: all
    num_fewshot: int | None = None  # None: each task's own default
    batch_size: int = 8
    data_dir: str | None = None
    log_samples: bool = False
    chat_template: bool = False
    max_gen_tokens: int | None = None  # generation tasks (gsm8k): the longest answer; None: each task's own


@dataclass
class BenchmarkResult:
    """Scores per task ({task: {metric: value, metric_stderr: value}}), lm-eval's own results and the samples."""

    scores: dict[str, dict[str, float]]
    raw: dict[str, Any]
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: float = 0.0


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The benchmark folder: the one given, else $LLMTUNE_BENCHMARK_DATA, else none (lm-eval's Hub tasks)."""
    chosen = data_dir or os.environ.get(DATA_DIR_VARIABLE)
    return Path(chosen).expanduser().resolve() if chosen else None


def check_benchmarks(settings: BenchmarkSettings, where: str = "--tasks") -> None:
    """Refuse unknown task names (with a suggestion), a missing data folder or files, and settings out of range -
    before any model is loaded."""
    if not settings.tasks:
        raise LlmtuneError(f"{where} names no task. Give one or more of: {', '.join(sorted(_headline_tasks()))}.")
    for name, value, least in (("limit", settings.limit, 1), ("num_fewshot", settings.num_fewshot, 0),
                               ("batch_size", settings.batch_size, 1), ("max_gen_tokens", settings.max_gen_tokens, 1)):
        if value is not None and value < least:
            raise LlmtuneError(f"benchmark {name} is {value}; it must be at least {least}.")
    data_dir = resolve_data_dir(settings.data_dir)
    unknown = [t for t in settings.tasks if t not in OFFLINE_TASKS]
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if unknown and offline:
        name = unknown[0]
        raise LlmtuneError(
            f"Benchmark task '{name}' is not one llmtune defines for local files{did_you_mean(name, OFFLINE_TASKS)} "
            f"Offline (HF_HUB_OFFLINE=1), the tasks are: {', '.join(sorted(_headline_tasks()))} (and mmlu_<subject>). "
            "Other lm-eval task names work when the Hub is reachable."
        )
    local = [t for t in settings.tasks if t in OFFLINE_TASKS]
    if local and data_dir is None:
        if offline:
            raise LlmtuneError(
                f"Benchmark tasks {', '.join(local)} need their files: give the benchmark folder with --data-dir "
                f"(recipe: eval.benchmark_data_dir, or ${DATA_DIR_VARIABLE}), laid out as "
                f"{', '.join(_expected_files(local))}. Without it they come from the Hub, which is offline here."
            )
        return
    if data_dir is not None:
        check_data_dir(data_dir, local)


def _headline_tasks() -> list[str]:
    return [name for name in OFFLINE_TASKS if not name.startswith("mmlu_")]


def _expected_files(tasks: Sequence[str]) -> list[str]:
    files = _benchmark_files().FILES
    return [f for benchmark in dict.fromkeys(OFFLINE_TASKS[t] for t in tasks) for f in files[benchmark]]


def check_data_dir(data_dir: Path, tasks: Sequence[str]) -> None:
    if not data_dir.is_dir():
        raise LlmtuneError(f"Benchmark folder '{data_dir}' does not exist. It should hold "
                           f"{', '.join(_expected_files(tasks))}.")
    missing = [f for f in _expected_files(tasks) if "SUBJECT" not in f and not (data_dir / f).is_file()]
    if "mmlu" in {OFFLINE_TASKS[t] for t in tasks} and not any((data_dir / "mmlu" / "test").glob("*_test.csv")):
        missing.append("mmlu/test/<subject>_test.csv")
    if missing:
        raise LlmtuneError(
            f"Benchmark folder '{data_dir}' lacks {', '.join(missing)} (the layout of the published files, as in "
            "../shared/data/benchmarks/README.md). Point --data-dir (eval.benchmark_data_dir) at a folder that holds "
            "them, or drop those tasks."
        )


def _benchmark_files() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("llmtune_benchmark_files", TASK_DIR / "benchmark_files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def data_files(data_dir: Path, tasks: Sequence[str]) -> dict[str, str]:
    """sha256 of every file the tasks read (relative path -> hash): which copy of a benchmark gave a score."""
    benchmarks = {OFFLINE_TASKS[t] for t in tasks if t in OFFLINE_TASKS}
    paths = [data_dir / f for b in sorted(benchmarks) for f in _benchmark_files().FILES[b] if "SUBJECT" not in f]
    if "mmlu" in benchmarks:
        paths += sorted((data_dir / "mmlu").glob("*/*.csv"))
    return {str(p.relative_to(data_dir)): sha256(p) for p in paths if p.is_file()}


def run_benchmarks(model: Any, tokenizer: Any, settings: BenchmarkSettings) -> BenchmarkResult:
    """Evaluate `model` (in eval mode, on its device) with lm-eval's `simple_evaluate` on the settings' tasks."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from llmtune.data.loading import quiet_logger
    from llmtune.measure.scorer import SharedContextLM

    data_dir = resolve_data_dir(settings.data_dir)
    local_only = data_dir is not None and all(t in OFFLINE_TASKS for t in settings.tasks)
    if "ifeval" in settings.tasks:
        from llmtune.patches.ifeval_without_nltk_data import ifeval_checkers

        ifeval_checkers()  # its checkers work offline before lm-eval imports them
    started = time.perf_counter()
    with quiet_logger("lm_eval"):  # it warns once per task about metadata kwargs: noise here
        manager = TaskManager(include_path=str(TASK_DIR) if data_dir else None, include_defaults=not local_only,
                              metadata={"data_dir": str(data_dir)} if data_dir else None)
        wrapped = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
        _check_known(manager, settings.tasks)
        raw = simple_evaluate(
            wrapped, tasks=list(settings.tasks), num_fewshot=settings.num_fewshot, limit=settings.limit,
            task_manager=manager, log_samples=settings.log_samples, apply_chat_template=settings.chat_template,
            fewshot_as_multiturn=settings.chat_template, bootstrap_iters=1000,
            gen_kwargs={"max_gen_toks": settings.max_gen_tokens} if settings.max_gen_tokens else None)
    samples = raw.pop("samples", None) or {}
    return BenchmarkResult(scores(raw), raw, samples, time.perf_counter() - started)


def _check_known(manager: Any, tasks: Sequence[str]) -> None:
    """A name neither llmtune's files nor lm-eval's registry defines: one error with the closest name."""
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            raise LlmtuneError(f"Benchmark task '{name}' is not an lm-eval task.{did_you_mean(name, known)} "
                               "`lm_eval ls tasks` lists them all.")


def scores(raw: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's results ({"acc,none": v, "acc_stderr,none": s, ...} per task and group) as {task: {"acc": v,
    "acc_stderr": s}}; a filter other than "none" is kept in the name ("exact_match,strict-match")."""
    table: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        for task, values in (raw.get(section) or {}).items():
            row = table.setdefault(task, {})
            for key, value in values.items():
                if "," not in key or not isinstance(value, int | float) or isinstance(value, bool):
                    continue
                metric, _, filter_name = key.partition(",")
                name = metric if filter_name == "none" else f"{metric},{filter_name}"
                row[name] = float(value) if math.isfinite(float(value)) else float("nan")
    return table


def headline_metric(row: dict[str, float]) -> str | None:
    """The score a task is compared by: acc_norm where it exists (length-normalised), else acc, else the strict
    exact match (GSM8K), else the first metric."""
    for name in ("acc_norm", "acc", "exact_match,strict-match", "exact_match"):
        if name in row:
            return name
    return next((n for n in row if not n.endswith("_stderr") and "_stderr," not in n), None)


def write_results(path: Path, result: BenchmarkResult, provenance: dict[str, Any]) -> list[Path]:
    """The results file (lm-eval's own results plus llmtune's provenance) and, when samples were logged, one JSON
    lines file per task beside it; written whole or not at all."""
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"llmtune": provenance, "scores": result.scores, "seconds": round(result.seconds, 1),
              **json.loads(json.dumps(result.raw, default=handle_non_serializable))}
    write_json(path, record)
    written = [path]
    for task, items in result.samples.items():
        sample_path = path.with_name(f"{path.stem}-samples-{task}.jsonl")
        write_text(sample_path, "".join(json.dumps(item, default=handle_non_serializable) + "\n" for item in items))
        written.append(sample_path)
    return written
