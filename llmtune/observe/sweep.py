"""`llmtune sweep`: an Optuna search over recipe keys, each trial an ordinary `llmtune train` run in its own process.

The study lives in SQLite in the sweep folder, so running the same command again resumes it: a trial that was
running when the sweep was killed is marked failed and a new one takes its place. Trials are launched exactly as
`llmtune train` would be (with `--accelerate` too); while one runs, its `evaluations.jsonl` is read as it grows
and each evaluation reported to Optuna; a trial the median pruner stops gets SIGTERM (it saves a checkpoint and
exits cleanly) and counts as pruned. At the end: a table of the trials, optimisation-history and
parameter-importance plots, and the best recipe as YAML.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmtune.config.loader import load_recipe
from llmtune.config.schema import Recipe
from llmtune.config.vocab import task_metrics
from llmtune.errors import LlmtuneError, did_you_mean
from llmtune.observe.console import EVALUATIONS_FILE
from llmtune.run.files import write_text

logger = logging.getLogger(__name__)

STUDY_FILE = "study.db"
DISTRIBUTIONS = ("log_uniform", "uniform", "int", "log_int", "choice")
MINIMIZED = ("loss", "perplexity")
MAIN_METRIC = {"classification": "accuracy", "dpo": "accuracy", "orpo": "accuracy", "simpo": "accuracy",
               "reward": "accuracy"}


@dataclasses.dataclass
class Sweep:
    recipe_path: str
    overrides: list[str]
    out: Path
    trials: int
    accelerate: str | None = None


def distributions(space: dict[str, dict[str, list]], recipe_path: str, overrides: list[str]) -> dict[str, Any]:
    """The recipe's `sweep.space` as Optuna distributions, each key checked against the recipe schema."""
    import optuna.distributions as d

    if not space:
        raise LlmtuneError(
            "The recipe has no 'sweep.space': name the keys to search, e.g. sweep.space: {training.learning_rate: "
            "{log_uniform: [1e-5, 1e-3]}, method.r: {choice: [8, 16, 32]}}."
        )
    found = {}
    for key, spec in space.items():
        where = f"sweep.space.{key}"
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            kind = next(iter(spec), "")
            raise LlmtuneError(f"'{where}' is {spec!r}; give one of {', '.join(DISTRIBUTIONS)} with its values, "
                               f"e.g. {{log_uniform: [1e-5, 1e-3]}}.{did_you_mean(str(kind), DISTRIBUTIONS)}")
        kind, values = next(iter(spec.items()))
        if kind != "choice" and (len(values) != 2 or not values[0] < values[1]):
            raise LlmtuneError(f"'{where}.{kind}' is {values!r}; give [low, high] with low < high.")
        if kind in ("log_uniform", "log_int") and values[0] <= 0:
            raise LlmtuneError(f"'{where}.{kind}' is {values!r}; a log scale needs low > 0.")
        found[key] = {"log_uniform": lambda v: d.FloatDistribution(float(v[0]), float(v[1]), log=True),
                      "uniform": lambda v: d.FloatDistribution(float(v[0]), float(v[1])),
                      "int": lambda v: d.IntDistribution(int(v[0]), int(v[1])),
                      "log_int": lambda v: d.IntDistribution(int(v[0]), int(v[1]), log=True),
                      "choice": lambda v: d.CategoricalDistribution(list(v))}[kind](values)
        load_recipe(recipe_path, [*overrides, _override(key, values[0])])  # the key exists, the value fits it
    return found


def objective(recipe: Recipe) -> tuple[str, str]:
    """(metric, direction) the sweep optimises."""
    metric = recipe.sweep.metric or MAIN_METRIC.get(recipe.task, "loss")
    valid = ["loss", *task_metrics(recipe.task)]
    if metric not in valid:
        raise LlmtuneError(f"'sweep.metric' is {metric!r}; the {recipe.task} task reports "
                           f"{', '.join(dict.fromkeys(valid))}.{did_you_mean(metric, valid)}")
    direction = recipe.sweep.direction
    if direction == "auto":
        direction = "minimize" if metric in MINIMIZED else "maximize"
    return metric, direction


def run_sweep(sweep: Sweep) -> dict[str, Any]:
    import optuna

    recipe = load_recipe(sweep.recipe_path, sweep.overrides)
    space = distributions(recipe.sweep.space, sweep.recipe_path, sweep.overrides)
    metric, direction = objective(recipe)
    if recipe.training.eval_every == "no" or not (recipe.data.eval_file or recipe.data.eval_split
                                                   or recipe.data.validation_fraction or recipe.data.holdout_every):
        raise LlmtuneError("A sweep compares trials by their evaluations: give the recipe evaluation data and "
                           "training.eval_every (a number of steps or 'epoch').")
    sweep.out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if recipe.sweep.pruning else optuna.pruners.NopPruner()
    study = optuna.create_study(storage=f"sqlite:///{sweep.out / STUDY_FILE}", study_name="llmtune",
                                direction=direction, pruner=pruner, load_if_exists=True)
    # Seeded for a reproducible sweep; offset by the trials already stored, so a resumed sweep does not draw the
    # first trials' values again.
    study.sampler = optuna.samplers.TPESampler(seed=recipe.training.seed + len(study.trials))
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        logger.warning("Trial %d was running when the sweep stopped; marking it failed, a new trial replaces it.",
                       trial.number)
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    failures = 0
    while (done := _finished(study)) < sweep.trials:
        trial = study.ask(space)
        logger.info("Trial %d (%d of %d): %s", trial.number, done + 1, sweep.trials, _describe(trial.params))
        state, value, seconds = run_trial(sweep, trial, metric, _logged_as(recipe.task, metric))
        study.tell(trial, value if state == optuna.trial.TrialState.COMPLETE else None, state=state)
        logger.info("Trial %d %s%s after %.0f s", trial.number, state.name.lower(),
                    f": {metric} {value:.4f}" if value is not None else "", seconds)
        failures = failures + 1 if state == optuna.trial.TrialState.FAIL else 0
        if failures == 3:
            raise LlmtuneError(f"Three trials in a row failed; see the .log files in {sweep.out}.")
    return summarize(study, sweep, metric, direction)


def run_trial(sweep: Sweep, trial: Any, metric: str, logged_as: str) -> tuple[Any, float | None, float]:
    """Train one trial in its own process, reporting each evaluation (where the metric is logged under
    `logged_as`); (state, final metric from metrics.json, seconds)."""
    from optuna.trial import TrialState

    run_dir = sweep.out / f"trial-{trial.number:03d}"
    command = [sys.executable, "-m", "llmtune", "train", sweep.recipe_path, *sweep.overrides,
               *(_override(k, v) for k, v in trial.params.items()), f"output.dir={run_dir}"]
    if sweep.accelerate:
        command += ["--accelerate", sweep.accelerate]
    start = time.perf_counter()
    with open(sweep.out / f"trial-{trial.number:03d}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        seen, pruned = 0, False
        while process.poll() is None:
            time.sleep(1.0)
            seen, pruned = _report(trial, run_dir / EVALUATIONS_FILE, logged_as, seen)
            if pruned:
                os.killpg(process.pid, signal.SIGTERM)  # llmtune saves a checkpoint and stops cleanly
                process.wait()
                return TrialState.PRUNED, None, time.perf_counter() - start
        _report(trial, run_dir / EVALUATIONS_FILE, logged_as, seen)
    seconds = time.perf_counter() - start
    metrics_file = run_dir / "metrics.json"
    if process.returncode != 0 or not metrics_file.is_file():
        logger.warning("Trial %d failed (exit %d); its output is in %s", trial.number, process.returncode,
                       sweep.out / f"trial-{trial.number:03d}.log")
        return TrialState.FAIL, None, seconds
    value = json.loads(metrics_file.read_text()).get("after", {}).get(metric)
    return (TrialState.COMPLETE, float(value), seconds) if value is not None else (TrialState.FAIL, None, seconds)


def _report(trial: Any, evaluations: Path, metric: str, seen: int) -> tuple[int, bool]:
    """Report the evaluations logged since the last look; whether the pruner stops the trial."""
    if not evaluations.is_file():
        return seen, False
    lines = evaluations.read_text().splitlines()
    complete = [line for line in lines if line.endswith("}")]  # a line still being written waits for the next look
    for line in complete[seen:]:
        entry = json.loads(line)
        value = entry.get(metric)
        # Step 0 is the untrained model, the same for every trial; 'after' repeats the best evaluation.
        if entry.get("split") == "eval" and value is not None and entry["step"] > 0:
            trial.report(float(value), entry["step"])
            if trial.should_prune():
                return len(complete), True
    return len(complete), False


def summarize(study: Any, sweep: Sweep, metric: str, direction: str) -> dict[str, Any]:
    """Table, plots and the best recipe, in the sweep folder."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    rows = [{"trial": t.number, "state": t.state.name.lower(), metric: t.value, **t.params,
             "last_step": max(t.intermediate_values, default=None),
             "seconds": round((t.datetime_complete - t.datetime_start).total_seconds())
             if t.datetime_complete and t.datetime_start else None} for t in trials]
    result: dict[str, Any] = {"metric": metric, "direction": direction, "trials": rows}
    if any(t.state == TrialState.COMPLETE for t in trials):
        best = study.best_trial
        result["best"] = {"trial": best.number, metric: best.value, "params": best.params}
        recipe = load_recipe(sweep.recipe_path, [*sweep.overrides, *(_override(k, v) for k, v in best.params.items())])
        result["best_recipe"] = str(write_recipe(recipe, sweep.out / "best_recipe.yaml"))
    result["plots"] = _plots(study, sweep.out)
    write_text(sweep.out / "sweep.json", json.dumps(result, indent=2, default=str) + "\n")
    write_text(sweep.out / "trials.md", trials_table(rows, metric) + "\n")
    return result


def trials_table(rows: list[dict[str, Any]], metric: str) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_recipe(recipe: Recipe, path: Path) -> Path:
    import yaml

    data = dataclasses.asdict(recipe)
    data.pop("sweep")  # the best recipe trains; the search that found it is in sweep.json
    header = "# The best trial's recipe, written by llmtune sweep (every key resolved). Train it with llmtune train.\n"
    write_text(path, header + yaml.safe_dump(data, sort_keys=False))
    return path


def _plots(study: Any, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    written = []
    for name, plot in (("optimization_history.png", optuna_plots.plot_optimization_history),
                       ("param_importances.png", optuna_plots.plot_param_importances),
                       ("intermediate_values.png", optuna_plots.plot_intermediate_values)):
        try:
            axes = plot(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importances need two complete trials
            logger.info("No %s: %s", name, exc)
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(7, 4)
        figure.tight_layout()
        figure.savefig(out / name)
        plt.close(figure)
        written.append(name)
    return written


def _logged_as(task: str, metric: str) -> str:
    """The name an evaluation logs the metric under: trl's for the preference tasks ('rewards/accuracies')."""
    from llmtune.tasks.preference_trainers import METRIC_KEYS

    return METRIC_KEYS.get(task, {}).get(metric, metric)


def _finished(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _override(key: str, value: Any) -> str:
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
