"""The one flow every task runs, in order:

    seed -> resolve the checkpoint -> run directory checks -> task.build (data, tokenizer, model, trainer)
    -> claim the run directory, write run.json -> evaluate before, train, evaluate after (complete-only
    checkpoints, Ctrl-C / SIGTERM) -> task.after_training -> save (adapter, merged or full) -> metrics.json
    -> report -> push

A task module (llmtune/tasks/) fills in only `build` (and `validate`); everything listed here happens once, in
this module, for every task.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from llmtune.config.renames import rename_keys
from llmtune.config.schema import Recipe
from llmtune.errors import LlmtuneError
from llmtune.hub.model_card import write_run_card
from llmtune.models.adapters import is_adapter, parameter_summary
from llmtune.models.loading import check_max_length
from llmtune.models.sources import ResolvedModel, hub_base_model, resolve_source
from llmtune.observe.console import attach_console, quiet_libraries, summary_table
from llmtune.observe.report import write_report
from llmtune.patches import forget_applied, in_use
from llmtune.run.checkpoints import MARKER, describe_write_error, prepare_resume
from llmtune.run.distributed import barrier
from llmtune.run.files import make_public, write_json
from llmtune.run.precision import resolved_precision
from llmtune.run.process import recorded_process
from llmtune.run.run_dir import (
    METRICS_FILE,
    RUN_RECORD,
    changed_settings,
    check_new_run_dir,
    check_writable,
    claim_run_dir,
    read_run_record,
    run_dir_for,
    write_run_record,
)
from llmtune.run.training import attach_run_callbacks, liger_kernels_on, train_and_evaluate
from llmtune.tasks import task_module
from llmtune.tasks.job import Job

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """A built run: the task's job, where it lives, and - when resuming - where it continues from."""

    recipe: Recipe
    job: Job
    run_dir: Path
    resume_from: Path | None = None
    previous: dict[str, Any] | None = None  # run.json of the run being resumed
    changed: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)  # settings changed by --force


def seed_everything(recipe: Recipe) -> None:
    """Seed Python, NumPy and torch (every process alike) before anything random happens: data shuffling, new heads,
    adapters, models built from scratch. `training.deterministic` also asks torch for deterministic kernels."""
    from transformers import set_seed

    set_seed(recipe.training.seed, deterministic=recipe.training.deterministic)


def build(recipe: Recipe, resume: bool = False, force: bool = False) -> Run:
    """Check the run directory, then let the task build its ready-to-train job (nothing is written yet)."""
    seed_everything(recipe)
    quiet_libraries()
    forget_applied()  # run.json lists the patches of this run only
    source = resolve_source(recipe)
    name = source.short_name if source else f"scratch-{recipe.scratch.architecture}"
    run_dir = run_dir_for(recipe.output.dir, recipe.task, name, resume)
    previous, changed, resume_from = None, {}, None
    if resume:
        previous, changed = check_resume_settings(run_dir, recipe, force)
    else:
        check_new_run_dir(run_dir, recipe.output.overwrite)
    check_before_loading(recipe, source, run_dir)
    if resume:
        resume_from = prepare_resume(run_dir)  # last: it removes incomplete checkpoints
    barrier()  # every process has checked before the main one claims the directory
    job = task_module(recipe.task).build(recipe, source, run_dir, resume)
    attach_run_callbacks(job.trainer, recipe.training, run_dir)
    attach_console(job.trainer, run_dir)
    return Run(recipe, job, run_dir, resume_from, previous, changed)


def train(recipe: Recipe, resume: bool = False, overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Run the recipe end to end; returns the metrics written to metrics.json."""
    if recipe.output.push_to_hub:
        from llmtune.hub.push import require_token

        require_token()  # fail before training, not after it
    run = build(recipe, resume, force)
    job, run_dir = run.job, run.run_dir
    trainer = job.trainer
    if trainer.is_world_process_zero():
        claim_run_dir(run_dir, recipe.output.overwrite, resume)
        write_run_record(run_dir, run_record(run, overrides))
    barrier()  # nobody trains into the directory before it is claimed
    with recorded_process(run_dir, trainer.is_world_process_zero()):  # process.json: running, then how it ended
        return train_save_report(run)


def train_save_report(run: Run) -> dict[str, Any]:
    """A claimed run: evaluate before, train, evaluate after, save, write metrics.json and the report, push."""
    recipe, job, run_dir, trainer = run.recipe, run.job, run.run_dir, run.job.trainer
    before = benchmarks_before(run)
    if job.before_training:
        job.before_training(run_dir)
    metrics = {**job.metrics, **train_and_evaluate(trainer, recipe.training, run_dir, run.resume_from, job.summarize)}
    if job.after_training:
        metrics |= job.after_training(run_dir)
    save(run)
    if not trainer.is_world_process_zero():
        return metrics
    if recipe.eval.benchmarks:
        from llmtune.measure.benchmark import benchmark_in_run, forgetting_metrics

        metrics["benchmarks"] = forgetting_metrics(before, benchmark_in_run(trainer, recipe, run_dir, "after"))
    write_json(run_dir / METRICS_FILE, metrics)  # one writer, one report, one push
    finish_records(run_dir)
    trainer.save_state()  # trainer_state.json: the log history the report plots
    if recipe.output.report:
        report(run_dir)
    logger.info("Done.\n%s", summary_table(metrics, run_dir))
    if recipe.output.push_to_hub:
        from llmtune.hub.push import push

        push(run_dir, recipe.output.push_to_hub, recipe.output.hub_private)
    return metrics


def benchmarks_before(run: Run) -> dict[str, Any] | None:
    """eval.benchmarks before training, on the main process (the others wait): the forgetting check's baseline.
    A resumed run reads the first start's scores back."""
    recipe, trainer = run.recipe, run.job.trainer
    if not recipe.eval.benchmarks:
        return None
    from llmtune.measure.benchmark import benchmark_in_run, check_model_is_whole, saved_benchmarks

    check_model_is_whole(trainer)
    before = None
    if run.resume_from:
        before = saved_benchmarks(run.run_dir, "before")
    elif trainer.is_world_process_zero() and recipe.eval.before_training:
        before = benchmark_in_run(trainer, recipe, run.run_dir, "before")
    barrier()
    return before


def validate(recipe: Recipe) -> dict[str, Any]:
    """Everything `train` checks before training, without training: model, output directory, precision, length,
    data. A run already in output.dir is reported (train would need --resume or output.overwrite=true)."""
    source = resolve_source(recipe)
    name = source.short_name if source else f"scratch-{recipe.scratch.architecture}"
    run_dir = run_dir_for(recipe.output.dir, recipe.task, name, resume=False)
    check_before_loading(recipe, source, run_dir)
    model = {"name": recipe.model.name, "resolved": source.path, "source": source.kind} if source else "from scratch"
    summary = {"task": recipe.task, "model": model, "method": recipe.method.type,
               "precision": resolved_precision(recipe.training.precision),
               **task_module(recipe.task).validate(recipe, source)}
    try:
        check_new_run_dir(run_dir, recipe.output.overwrite)
    except LlmtuneError:
        summary["output_dir"] = f"{run_dir} already holds a run: train it with --resume or output.overwrite=true"
    return summary


def check_before_loading(recipe: Recipe, source: ResolvedModel | None, run_dir: Path) -> None:
    """The checks that need no weights: the run directory can be written, the precision and kernels exist on this
    machine, data.max_length fits the checkpoint's positions, the benchmarks' files and the task's own exist."""
    check_writable(run_dir)
    resolved_precision(recipe.training.precision)  # fp16 without a GPU is refused here
    liger_kernels_on(recipe.training.liger_kernels)  # 'on' without CUDA or the package likewise
    if source:
        check_max_length(recipe, source.path)
    if recipe.eval.benchmarks:
        from llmtune.measure.benchmark import recipe_settings
        from llmtune.measure.harness import check_benchmarks

        check_benchmarks(recipe_settings(recipe), "eval.benchmarks")
    own_checks = getattr(task_module(recipe.task), "check_before_loading", None)
    if own_checks:  # a task's own files and runs (grpo's reward functions and reward runs)
        own_checks(recipe)


# --- steps ----------------------------------------------------------------------------------------------------


def recipe_record(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """The resolved recipe as saved in run.json: output.dir is the run's actual folder."""
    data = dataclasses.asdict(recipe)
    data["output"]["dir"] = str(run_dir)
    return data


def check_resume_settings(run_dir: Path, recipe: Recipe, force: bool) -> tuple[dict[str, Any], dict]:
    """The run being resumed (its run.json) and the training settings the command changes - refused without
    --force, since the rest of the run would then train differently from its start."""
    if not (run_dir / RUN_RECORD).is_file():
        raise LlmtuneError(
            f"--resume: '{run_dir}' holds no llmtune run (no {RUN_RECORD}). Point output.dir at the folder of the "
            "run to continue, or start a new run without --resume."
        )
    previous = read_run_record(run_dir)
    recorded = rename_keys(previous.get("recipe", {}), warn=False)  # a run recorded before a key was renamed
    changed = changed_settings(recorded, recipe_record(recipe, run_dir))
    check_not_finished(run_dir, changed)
    if changed and not force:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in ((k, *v) for k, v in changed.items()))
        raise LlmtuneError(
            f"--resume: the command changes settings of the run in '{run_dir}' ({listed}). The rest of the run "
            "would train differently from its start. Resume with the run's own settings (drop those overrides), "
            "or add --force to continue with the new values (run.json records the change)."
        )
    if changed:
        logger.warning("--force: resuming with changed settings: %s", ", ".join(changed))
    return previous, changed


def check_not_finished(run_dir: Path, changed: dict[str, tuple[Any, Any]]) -> None:
    """A run that already finished (metrics.json written) has nothing to resume with its own settings: say so rather
    than re-saving it. Resuming it to train further (more epochs or steps, with --force) stays possible."""
    if (run_dir / METRICS_FILE).is_file() and not changed:
        raise LlmtuneError(
            f"--resume: the run in '{run_dir}' already finished ({METRICS_FILE} is written); there is nothing left to "
            "train with its settings. To train it further, resume with a larger training.epochs or training.max_steps "
            "plus --force; to start a new run from its model, use model.name=" + str(run_dir) + " without --resume."
        )


def run_record(run: Run, overrides: list[str] | None) -> dict[str, Any]:
    """run.json: what produced this run. A resumed run keeps its record and adds an entry to 'resumes'."""
    recipe, trainer = run.recipe, run.job.trainer
    if run.previous is not None:
        resumes = [*run.previous.get("resumes", []), {
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "from_checkpoint": run.resume_from.name,
            "overrides": overrides or [], "changed": {k: {"from": a, "to": b} for k, (a, b) in run.changed.items()},
        }]
        return {**run.previous, "recipe": recipe_record(recipe, run.run_dir), "resumes": resumes}
    args = trainer.args
    precision = resolved_precision(recipe.training.precision)
    from llmtune.data.loading import fingerprint_sources

    return {
        "recipe": recipe_record(recipe, run.run_dir),
        "overrides": overrides or [],
        "data": fingerprint_sources(recipe.data),
        "model_path": run.job.model_path,
        "world_size": args.world_size,
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        # Evaluation runs through the same autocast as training; `llmtune eval` and `predict` reuse it.
        "precision": {"training": precision, "evaluation": precision},
        "seed": recipe.training.seed,
        "parameters": parameter_summary(trainer.model),
        **run.job.record,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "checkpoint_marker": MARKER,  # checkpoints count only with it (llmtune/run/checkpoints.py)
        "patches": in_use(),  # hooks into libraries' internals this run's build used (llmtune/patches/)
    }


def save(run: Run) -> None:
    """Leave the adapter, merged or full model at the top of the run directory (every process takes part)."""
    from llmtune.inference.merge import merge_adapter
    from llmtune.inference.trained import ADAPTER_SUBDIR, save_trained

    recipe, trainer, run_dir = run.recipe, run.job.trainer, run.run_dir
    kind = recipe.output.save
    if kind == "auto":
        kind = "adapter" if is_adapter(trainer.model) else "full"
    target = run_dir / ADAPTER_SUBDIR if kind == "merged" else run_dir
    try:
        save_trained(trainer, target, hub_base_model(dataclasses.asdict(recipe)), recipe.model.revision)
        if kind == "merged" and trainer.is_world_process_zero():
            merge_adapter(target, run_dir, base=run.job.model_path, into_run=True)
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise LlmtuneError(
            f"Saving the trained model in '{run_dir}' failed: {describe_write_error(exc, run_dir)}. Complete "
            "checkpoints in that folder, if the run saved any, are intact: once the problem is fixed, run the same "
            "command plus --resume (without one, run it again with output.overwrite=true)."
        ) from exc
    if trainer.is_world_process_zero():
        make_public(run_dir)
        logger.info("Saved the %s to %s", "adapter" if kind == "adapter" else f"{kind} model", run_dir)


def finish_records(run_dir: Path) -> None:
    """The run's README.md (llmtune's card, not a library's draft) and run.json's list of the patches used while
    training too; a failure here is reported, never fatal: the trained model and metrics are already saved."""
    try:
        write_run_card(run_dir)
        write_run_record(run_dir, {**read_run_record(run_dir), "patches": in_use()})
    except Exception as exc:  # noqa: BLE001 - any failure here must not cost the user the finished run
        logger.warning("Could not finish the run's card and records (%s: %s).", type(exc).__name__, exc)


def report(run_dir: Path) -> None:
    """Write the run's report; a plotting failure is reported, never fatal: the trained model is already saved."""
    try:
        path = write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - any failure here must not cost the user the finished run
        logger.warning("Could not write the report (%s: %s); rebuild it with: llmtune report %s",
                       type(exc).__name__, exc, run_dir)
        return
    logger.info("Report: %s", path)
