"""The Python API: every llmtune command as a typed function that returns its result instead of printing it. The
CLI (llmtune/cli/) parses arguments, calls one of these and prints; a notebook calls them directly:

    import llmtune
    recipe = llmtune.load_recipe("recipes/sst2_minilm_lora.yaml", ["training.epochs=1", "output.dir=runs/nb"])
    metrics = llmtune.train(recipe)
    llmtune.predict("runs/nb", ["a gripping, beautiful film"])
    llmtune.evaluate("runs/nb", "dev.tsv")

Arguments are checked here, before any model loads; a problem the user can fix raises `LlmtuneError` (one
paragraph naming the argument, the value and what would be valid). Heavy libraries are imported inside the
functions that need them, so `import llmtune` stays quick.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune.config.loader import load_recipe
from llmtune.config.schema import Recipe
from llmtune.config.vocab import CLASSIFICATION_METRICS
from llmtune.errors import LlmtuneError
from llmtune.inference.loading import LanguageModel, load_language_model

if TYPE_CHECKING:
    from llmtune.inference.merge import MergeResult
    from llmtune.observe.plan import Plan
    from llmtune.ship.export import Exported

__all__ = [
    "load_recipe", "validate", "plan", "build_trainer", "train", "launch", "preview", "constrained_prompts", "evaluate",
    "predict", "generate", "perplexity", "benchmark", "load_language_model", "LanguageModel", "merge", "export", "push",
    "report", "sweep", "serve_app", "serve",
]


def _listed(value: Any) -> list:
    """A sequence argument as a list; one string is one item (not a list of its characters)."""
    return [value] if isinstance(value, str | Path) else list(value)


def _at_least(name: str, value: int | float | None, minimum: int | float) -> None:
    if value is not None and value < minimum:
        raise LlmtuneError(f"{name} must be at least {minimum}; got {value}.")


# --- recipes: check, plan, train --------------------------------------------------------------------------------


def validate(recipe: Recipe) -> dict[str, Any]:
    """Check that the recipe's model resolves and its data loads and tokenizes as configured; nothing is trained.
    Returns a summary (task, model, method, precision, data sizes, ...)."""
    from llmtune import pipeline

    return pipeline.validate(recipe)


def plan(recipe: Recipe, device_memory: str | float | None = None, dry_run: bool = True) -> Plan:
    """Memory and time before training: parameters, a per-device memory breakdown, tokens and steps, and (with
    `dry_run`) timed real steps. `device_memory` ("24GB", "16GiB" or bytes) says whether it fits. Nothing is written
    where the run would go."""
    import tempfile

    from llmtune import pipeline
    from llmtune.observe.plan import make_plan, parse_size

    budget = None
    if device_memory is not None:
        try:
            budget = parse_size(device_memory) if isinstance(device_memory, str) else float(device_memory)
        except ValueError as exc:
            raise LlmtuneError(f"--device-memory: {exc}.") from exc
        if budget <= 0:
            raise LlmtuneError(f"--device-memory must be more than 0; got {device_memory!r} (e.g. 24GB or 16GiB).")
    recipe = copy.deepcopy(recipe)  # the caller's recipe keeps its output settings
    with tempfile.TemporaryDirectory(prefix="llmtune-plan-") as scratch:
        recipe.output.dir = str(Path(scratch) / "run")
        recipe.output.push_to_hub = None
        trainer = pipeline.build(recipe).job.trainer
        if recipe.task == "grpo":  # its steps are mostly sampling: timed as whole steps
            from llmtune.observe.plan_grpo import make_grpo_plan

            return make_grpo_plan(trainer, recipe, budget, dry_run=dry_run)
        return make_plan(trainer, recipe, budget, dry_run=dry_run)


def build_trainer(recipe: Recipe) -> Any:
    """A ready-to-train transformers Trainer for the recipe (seeded, data tokenized, model wrapped)."""
    from llmtune import pipeline

    return pipeline.build(recipe).job.trainer


def train(recipe: Recipe, resume: bool = False, overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Run the recipe end to end (train, evaluate, save, predict, report, push); returns the run's metrics.

    `resume` continues the run in output.dir from its newest complete checkpoint; `force` accepts settings that
    differ from the run's own when resuming. `overrides` are only recorded in run.json (apply them with
    `load_recipe(path, overrides)`)."""
    from llmtune import pipeline

    return pipeline.train(recipe, resume=resume, overrides=overrides, force=force)


def launch(recipe_path: str | Path, overrides: Sequence[str] = (), accelerate: str = "single",
           num_processes: int | None = None, resume: bool = False, force: bool = False) -> int:
    """Train the recipe under `accelerate launch` with one of llmtune's accelerate configs (by short name, e.g.
    cpu_ddp, multi_gpu, fsdp) or a config file; returns the launcher's exit code."""
    from llmtune.run.distributed import relaunch

    _at_least("num_processes", num_processes, 1)
    overrides = _listed(overrides)
    recipe = load_recipe(recipe_path, overrides)  # a bad recipe fails here, before any process starts
    flags = [flag for flag, on in (("--resume", resume), ("--force", force)) if on]
    return relaunch(accelerate, [str(recipe_path), *overrides, *flags], num_processes,
                    recipe.training.stop_grace_seconds)


def preview(recipe: Recipe, samples: int = 3, colour: bool = False) -> str:
    """SFT / pretraining data as the model sees it: `samples` tokenized rows with every token marked trained or
    masked, and the training split's token statistics."""
    from llmtune.observe.preview import preview as render

    _at_least("samples", samples, 0)
    return render(recipe, samples, colour)


def constrained_prompts(source: str | Path, out: str | Path, per_prompt: int = 2, seed: int = 0,
                        kinds: Sequence[str] | None = None, limit: int | None = None) -> dict[str, Any]:
    """Prompts for task grpo's `constraints` reward: each instruction of `source` (an instruction, prompt or text
    column; alpaca's input appended) with 1..`per_prompt` sampled constraints, written to `out` as JSONL
    ({"prompt", "constraints"}). Returns {"out", "rows", "kinds": {kind: count}}."""
    from collections import Counter

    from llmtune.data.loading import load_file
    from llmtune.rewards.constraints import constrained_prompts as build

    _at_least("per_prompt", per_prompt, 1)
    _at_least("limit", limit, 1)
    target = Path(out)
    if target.exists():
        raise LlmtuneError(f"--out '{target}' exists; llmtune does not overwrite it. Give a new file name.")
    rows = load_file(str(source), "source")
    column = next((c for c in ("instruction", "prompt", "text") if c in rows.column_names), None)
    if column is None:
        raise LlmtuneError(f"'{source}' has no instruction, prompt or text column (columns: "
                           f"{', '.join(rows.column_names)}). Give a file of instructions.")
    texts = [f"{r[column]}\n\n{r['input']}" if r.get("input") else str(r[column]) for r in rows]
    made = build(texts[:limit] if limit else texts, seed, per_prompt, kinds)
    from llmtune.run.files import write_text

    target.parent.mkdir(parents=True, exist_ok=True)
    write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in made))
    counts = Counter(c["kind"] for r in made for c in r["constraints"])
    return {"out": str(target), "rows": len(made), "kinds": dict(counts.most_common())}


# --- using a trained run -----------------------------------------------------------------------------------------


def evaluate(run: str | Path, data: str | Path, metrics: Sequence[str] = CLASSIFICATION_METRICS,
             text_column: str | None = None, text_pair_column: str | None = None, label_column: str | None = None,
             batch_size: int | None = None, precision: str = "auto") -> dict[str, Any]:
    """Metrics of a classification run (text or images, or an ONNX export) on labelled data: a data file, or for
    an image run a folder of class subfolders. Scored in the run's own precision and batch size unless asked."""
    from llmtune.inference.loading import is_image_run, load_classifier, load_image_classifier

    _at_least("batch_size", batch_size, 1)
    _check_metrics(metrics)
    if is_image_run(run):
        from llmtune.data.loading import load_image_rows

        classifier = load_image_classifier(run, "eval", precision)
        return classifier.evaluate(load_image_rows(str(data), "--data"), list(metrics), Path(data).resolve().parent)
    from llmtune.data.loading import load_file
    from llmtune.inference.classifier import evaluate_file
    from llmtune.inference.loading import require_kind

    require_kind(run, "classification", "eval --data")  # a run of the wrong kind is named first
    rows = load_file(str(data), "--data")  # a missing or unreadable file fails before the model loads
    columns = {"text": text_column, "text_pair": text_pair_column, "label": label_column}
    classifier = load_classifier(run, "eval --data", precision, columns)
    return evaluate_file(classifier, rows, list(metrics), batch_size)


def predict(run: str | Path, texts: Sequence[str] = (), file: str | Path | None = None,
            images: Sequence[str | Path] = (), text_column: str | None = None, text_pair_column: str | None = None,
            batch_size: int | None = None, precision: str = "auto") -> list[dict[str, Any]]:
    """Labels with probabilities, one record per input: for a text classifier from `texts` and the rows of a data
    `file`; for an image classifier from `images` and a `file` listing image paths, one a line."""
    from llmtune.inference.loading import is_image_run

    _at_least("batch_size", batch_size, 1)
    texts, images = _listed(texts), _listed(images)
    if images or is_image_run(run):
        return _predict_images(run, images, file, texts, precision)
    from llmtune.data.loading import load_file, require_columns
    from llmtune.inference.loading import load_classifier

    rows = load_file(str(file), "--file") if file else None
    classifier = load_classifier(run, "predict", precision, {"text": text_column, "text_pair": text_pair_column})
    pairs = None
    if rows is not None:
        columns = classifier.columns
        require_columns(rows, "input", {"--text-column": columns["text"], "--text-pair-column": columns["text_pair"]})
        texts += rows[columns["text"]]
        pairs = rows[columns["text_pair"]] if columns["text_pair"] else None
    if not texts:
        raise LlmtuneError("predict needs texts (--text, one or more) or a data file (--file).")
    return [{"text": text, **pred} for text, pred in zip(texts, classifier.predict(texts, pairs, batch_size))]


def _predict_images(run: str | Path, names: list[str | Path], listing: str | Path | None, texts: Sequence[str],
                    precision: str) -> list[dict[str, Any]]:
    from llmtune.inference.loading import load_image_classifier

    if texts:
        raise LlmtuneError(f"'{run}' classifies images: give --image FILE (or --file with image paths), not --text.")
    names = [str(name) for name in names]
    if listing:
        listing = Path(listing)
        if not listing.is_file():
            raise LlmtuneError(f"--file is '{listing}', which does not exist. For an image classifier it is a text "
                               "file listing image paths, one a line.")
        for line in listing.read_text().splitlines():
            if line.strip():  # relative paths: from the current folder, else from the list's own folder
                path = Path(line.strip())
                names.append(str(path if path.exists() or path.is_absolute() else listing.parent / path))
    if not names:
        raise LlmtuneError("predict needs --image (one or more) or --file (a list of image paths) for an image run.")
    classifier = load_image_classifier(run, "predict --image", precision)
    return [{"image": name, **pred} for name, pred in zip(names, classifier.predict(names, names))]


def _check_metrics(metrics: Sequence[str]) -> None:
    unknown = [name for name in metrics if name not in CLASSIFICATION_METRICS]
    if unknown or not metrics:
        raise LlmtuneError(f"metrics {list(metrics)!r}: choose one or more of {', '.join(CLASSIFICATION_METRICS)}.")


def generate(run: str | Path | LanguageModel, prompts: Sequence[str | list[dict[str, str]]],
             max_new_tokens: int = 128, raw: bool = False, precision: str = "auto") -> list[dict[str, Any]]:
    """Greedy replies of a causal-LM run or model (a run directory, checkpoint, Hub id, .gguf, or a model from
    `load_language_model`), with its chat template unless `raw`. A prompt is a user message or a message list."""
    _at_least("max_new_tokens", max_new_tokens, 1)
    prompts = _listed(prompts)
    if not prompts:
        raise LlmtuneError("generate needs at least one prompt (--prompt).")
    return _language_model(run, "generate", precision, raw).generate(prompts, max_new_tokens)


def perplexity(run: str | Path | LanguageModel, text_file: str | Path, max_length: int = 1024,
               stride: int | None = None, precision: str = "auto") -> dict[str, Any]:
    """Sliding-window perplexity of a causal LM on a text file: windows of `max_length` tokens, moved by `stride`
    (default `max_length`), each scoring only the tokens no earlier window scored."""
    from llmtune.data.files import read_text_file

    _at_least("max_length", max_length, 2)
    _at_least("stride", stride, 1)
    if stride is not None and stride > max_length:
        raise LlmtuneError(f"stride is {stride}, longer than max_length {max_length}: tokens between windows would "
                           "never be scored. Give a stride of at most max_length.")
    text = read_text_file(text_file, "--text-file")
    lm = _language_model(run, "eval --text-file", precision)
    return {"text_file": str(text_file), "max_length": max_length, "stride": stride or max_length,
            **lm.perplexity(text, max_length, stride)}


def benchmark(run: str | Path | LanguageModel, tasks: Sequence[str], limit: int | None = None,
              num_fewshot: int | None = None, batch_size: int = 8, data_dir: str | Path | None = None,
              precision: str = "auto", out: str | Path | None = None, log_samples: bool = False,
              chat_template: bool = False, max_gen_tokens: int | None = None) -> dict[str, Any]:
    """Standard benchmarks (lm-evaluation-harness tasks: arc_easy, piqa, hellaswag, mmlu, gsm8k, ...) on a causal-LM
    run or model exactly as llmtune loads it - an adapter unmerged on its (possibly 4-bit) base, in the run's
    precision. Offline the tasks read the benchmark files in `data_dir` (or $LLMTUNE_BENCHMARK_DATA). A run
    directory keeps a results file in its benchmarks/ folder; `out` names one for any model."""
    from llmtune.measure.benchmark import benchmark as score
    from llmtune.measure.benchmark import results_path_for
    from llmtune.measure.harness import BenchmarkSettings, check_benchmarks

    settings = BenchmarkSettings(_listed(tasks), limit, num_fewshot, batch_size,
                                 str(data_dir) if data_dir is not None else None, log_samples, chat_template,
                                 max_gen_tokens)
    check_benchmarks(settings)
    if out is not None:
        from llmtune.run.files import why_unwritable

        if problem := why_unwritable(Path(out).parent):
            raise LlmtuneError(f"--out is '{out}', but {problem}. Give a results file in a folder you can write to.")
    source = str(run) if not isinstance(run, LanguageModel) else "a loaded model"
    lm = _language_model(run, "eval --tasks", precision)
    path = results_path_for(run, out) if not isinstance(run, LanguageModel) else (Path(out) if out else None)
    return score(lm, settings, source, path)


def _language_model(run: str | Path | LanguageModel, command: str, precision: str, raw: bool = False
                    ) -> LanguageModel:
    if not isinstance(run, LanguageModel):
        return load_language_model(run, command, precision, raw)
    if precision != "auto" or raw:
        raise LlmtuneError("precision and raw are chosen when a model is loaded: pass them to "
                           "llmtune.load_language_model(run, command, precision, raw), not with the loaded model.")
    return run


# --- shipping ----------------------------------------------------------------------------------------------------


def merge(run: str | Path, out: str | Path, base: str | None = None, dtype: str = "float32",
          tolerance: float = 1e-4, overwrite: bool = False) -> MergeResult:
    """Merge a run's LoRA/DoRA adapter into a full-precision copy of its base, checked against adapter-on-base
    logits before it is kept."""
    from llmtune.inference.loading import check_run_argument
    from llmtune.inference.merge import merge_adapter
    from llmtune.ship.export import check_output_folder

    check_run_argument(run)
    if not tolerance > 0:
        raise LlmtuneError(f"tolerance must be more than 0; got {tolerance}.")
    if Path(out).exists() and not Path(out).is_dir():
        raise LlmtuneError(f"--out is '{out}', which is a file; give a folder (new or empty) for the merged model.")
    check_output_folder(out)
    return merge_adapter(run, out, base=base, dtype=dtype, tolerance=tolerance, overwrite=overwrite)


def export(run: str | Path, format: str, quant: str | None = None, out: str | Path | None = None,
           overwrite: bool = False) -> Exported:
    """Export a run as GGUF (llama.cpp), GGUF + Ollama Modelfile, or ONNX (classifiers), read back and compared
    with the run's model before it is kept."""
    from llmtune.inference.loading import check_run_argument
    from llmtune.ship.export import export as write_export

    check_run_argument(run)
    return write_export(run, format, quant, out, overwrite)


def push(run: str | Path, repo_id: str, private: bool = False, merged: bool = False) -> str:
    """Publish a run to the Hugging Face Hub with a model card; returns the repo's URL."""
    from llmtune.hub.push import push as upload
    from llmtune.inference.loading import check_run_argument

    check_run_argument(run)
    return upload(run, repo_id, private=private, merged=merged)


# --- looking at runs ---------------------------------------------------------------------------------------------


def report(runs: Sequence[str | Path], out: str | Path = "runs/compare") -> Path:
    """Rebuild one run's report.html and plots, or compare several runs in `out`; returns the page's path."""
    from llmtune.observe.report import write_comparison, write_report

    folders = [Path(run) for run in _listed(runs)]
    if not folders:
        raise LlmtuneError("report needs one or more run directories.")
    return write_report(folders[0]) if len(folders) == 1 else write_comparison(folders, Path(out))


def sweep(recipe_path: str | Path, overrides: Sequence[str] = (), trials: int | None = None,
          space: str | Path | None = None, out: str | Path | None = None, accelerate: str | None = None,
          ) -> dict[str, Any]:
    """Optuna search over the recipe's sweep.space (or a `space` YAML file); each trial is `llmtune train` in its
    own process and run directory under `out`, and the same call resumes a stopped sweep. Returns the trials, the
    best trial and the path of its recipe."""
    from llmtune.observe.sweep import Sweep, check_trials, run_sweep

    if trials is not None:
        check_trials(trials)
    if accelerate:
        from llmtune.run.distributed import config_path

        config_path(accelerate)  # a bad config name is refused now, not by every trial in turn
    overrides = _listed(overrides) + (_space_overrides(Path(space)) if space else [])
    recipe = load_recipe(recipe_path, overrides)  # a bad recipe or space fails here, before Optuna loads
    folder = Path(out or f"runs/sweep-{Path(recipe_path).stem}")
    count = recipe.sweep.trials if trials is None else trials
    return {**run_sweep(Sweep(str(recipe_path), overrides, folder, count, accelerate)), "out": str(folder)}


def _space_overrides(path: Path) -> list[str]:
    import yaml

    try:
        section = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise LlmtuneError(f"--space: cannot read '{path}' ({exc}). Give a YAML file such as "
                           "'space: {training.learning_rate: {log_uniform: [1e-5, 1e-3]}}'.") from exc
    if not isinstance(section, dict):
        raise LlmtuneError(f"--space: '{path}' must hold a mapping with 'space' (and optionally metric, direction, "
                           "trials, pruning).")
    section = section.get("sweep", section)
    return [f"sweep.{key}={json.dumps(value)}" for key, value in section.items()]


# --- serving -----------------------------------------------------------------------------------------------------


def serve_app(run: str | Path, api_key: str | None = None, name: str | None = None, max_tokens: int = 1024,
              precision: str = "auto") -> Any:
    """The OpenAI-compatible ASGI app for a run or model (chat/completions for causal LMs, /v1/classify for
    classifiers), to mount or run with any ASGI server."""
    from llmtune.ship.serve import Limits, make_app

    _at_least("max_tokens", max_tokens, 1)
    return make_app(_engine(run, precision), _served_name(run, name), api_key, Limits(max_tokens=max_tokens))


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          name: str | None = None, max_tokens: int = 1024, precision: str = "auto") -> None:
    """Serve a run over HTTP until Ctrl-C (this machine only unless `host` says otherwise). The port is checked
    before the model loads."""
    from llmtune.ship.serve import Limits, check_port_free
    from llmtune.ship.serve import serve as run_server

    _at_least("max_tokens", max_tokens, 1)
    if not 0 < port < 65536:
        raise LlmtuneError(f"--port must be between 1 and 65535; got {port}.")
    check_port_free(host, port)
    run_server(_engine(run, precision), _served_name(run, name), host, port, api_key, Limits(max_tokens=max_tokens))


def _engine(run: str | Path, precision: str) -> Any:
    from llmtune.inference.loading import check_run_argument, load_classifier
    from llmtune.inference.trained import model_kind
    from llmtune.ship.serve import TextClassifier

    check_run_argument(run)
    if model_kind(run) == "classification":
        classifier = load_classifier(run, "serve", precision)
        return TextClassifier(classifier.predict, classifier.labels)
    return load_language_model(run, "serve", precision)


def _served_name(run: str | Path, name: str | None) -> str:
    return name or Path(str(run).rstrip("/")).name
