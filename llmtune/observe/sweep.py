"""`llmtune sweep`: an Optuna search over recipe keys, each trial an ordinary `llmtune train` run in its own process.

The study lives in SQLite in the sweep folder, so running the same command again resumes it: a trial that was
running when the sweep was killed is marked failed and a new one takes its place. Trials are launched exactly as
`llmtune train` would be (with `--accelerate` too); while one runs, its `evaluations.jsonl` is read as it grows
and each evaluation reported to Optuna; a trial the median pruner stops gets SIGTERM (it saves a checkpoint and
exits cleanly) and counts as pruned. SIGTERM or Ctrl-C to the sweep stops its running trial the same way (then kills
it if it has not ended in time), and a trial's process gets SIGTERM from the kernel if the sweep dies outright, so
no trial is left training on its own. At the end: a table of the trials, optimisation-history and
parameter-importance plots, and the best recipe as YAML.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmtune.config.loader import load_recipe
from llmtune.config.schema import Recipe
from llmtune.config.vocab import task_metrics
from llmtune.errors import LlmtuneError, TrainingStopped, did_you_mean
from llmtune.observe.sweep_trials import SIGNAL_NAMES, Sweep, _override, run_trial
from llmtune.run.files import write_text

logger = logging.getLogger(__name__)

STUDY_FILE = "study.db"
DISTRIBUTIONS = ("log_uniform", "uniform", "int", "log_int", "choice")
MINIMIZED = ("loss", "perplexity")
MAIN_METRIC = {"classification": "accuracy", "dpo": "accuracy", "orpo": "accuracy", "simpo": "accuracy",
               "reward": "accuracy"}


def distributions(space: dict[str, dict[str, list]], recipe_path: str, overrides: list[str]) -> dict[str, Any]:
    """The recipe's `sweep.space` as Optuna distributions; every value a trial can be given (each choice, both
    ends of a range) is checked against the recipe schema, so a bad one fails now rather than as a failed trial."""
    import optuna.distributions as d

    if not space:
        raise LlmtuneError(
            "The recipe has no 'sweep.space': name the keys to search, e.g. sweep.space: {training.learning_rate: "
            "{log_uniform: [1e-5, 1e-3]}, method.r: {choice: [8, 16, 32]}}."
        )
    make = {"log_uniform": lambda v: d.FloatDistribution(float(v[0]), float(v[1]), log=True),
            "uniform": lambda v: d.FloatDistribution(float(v[0]), float(v[1])),
            "int": lambda v: d.IntDistribution(int(v[0]), int(v[1])),
            "log_int": lambda v: d.IntDistribution(int(v[0]), int(v[1]), log=True),
            "choice": lambda v: d.CategoricalDistribution(list(v))}
    found = {}
    for key, spec in space.items():
        where = f"sweep.space.{key}"
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            kind = next(iter(spec), "")
            raise LlmtuneError(f"'{where}' is {spec!r}; give one of {', '.join(DISTRIBUTIONS)} with its values, "
                               f"e.g. {{log_uniform: [1e-5, 1e-3]}}.{did_you_mean(str(kind), DISTRIBUTIONS)}")
        kind, values = next(iter(spec.items()))
        _check_shape(f"{where}.{kind}", kind, values)
        for value in values:
            try:
                load_recipe(recipe_path, [*overrides, _override(key, value)])  # the key exists, the value fits it
            except LlmtuneError as exc:
                raise LlmtuneError(f"'{where}.{kind}' holds {value!r}, which {key} cannot take: {exc}") from exc
        _check_range(f"{where}.{kind}", kind, values)
        found[key] = make[kind](values)
    return found


def _check_shape(where: str, kind: str, values: list) -> None:
    if kind == "choice" and not values:
        raise LlmtuneError(f"'{where}' has no values; give the values to try, e.g. {{choice: [8, 16, 32]}}.")
    if kind != "choice" and len(values) != 2:
        raise LlmtuneError(f"'{where}' is {values!r}; give [low, high] with low < high.")


def _check_range(where: str, kind: str, values: list) -> None:
    """[low, high] of numbers, low < high (a log scale: low > 0); the key's schema has accepted both ends."""
    if kind == "choice":
        return
    wrong = next((v for v in values if isinstance(v, bool) or not isinstance(v, int | float)), None)
    if wrong is not None:
        raise LlmtuneError(f"'{where}' is {values!r}; {wrong!r} is not a number. Give [low, high] as numbers, "
                           "low < high, or list the values to try as {choice: [...]}.")
    if kind in ("int", "log_int") and not all(float(v).is_integer() for v in values):
        raise LlmtuneError(f"'{where}' is {values!r}; an {kind} range needs whole numbers (use uniform or "
                           "log_uniform for fractions).")
    if not values[0] < values[1]:
        raise LlmtuneError(f"'{where}' is {values!r}; give [low, high] with low < high.")
    if kind in ("log_uniform", "log_int") and values[0] <= 0:
        raise LlmtuneError(f"'{where}' is {values!r}; a log scale needs low > 0.")


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


def check_trials(trials: Any) -> None:
    """The number of finished trials a sweep runs to: a whole number, 1 or more."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise LlmtuneError(f"--trials (or sweep.trials) is {trials!r}; give the number of finished trials the sweep "
                           "runs to, 1 or more (a resumed sweep counts the trials it has already finished).")


def run_sweep(sweep: Sweep) -> dict[str, Any]:
    """Run (or resume) a sweep to `sweep.trials` finished trials; SIGTERM or Ctrl-C stop the running trial (it
    saves a checkpoint) and raise TrainingStopped, and the same call resumes."""
    import optuna

    from llmtune.observe.report import make_out_folder

    check_trials(sweep.trials)
    recipe = load_recipe(sweep.recipe_path, sweep.overrides)
    space = distributions(recipe.sweep.space, sweep.recipe_path, sweep.overrides)
    metric, direction = objective(recipe)
    if recipe.training.eval_every == "no" or not (recipe.data.eval_file or recipe.data.eval_split
                                                   or recipe.data.validation_fraction or recipe.data.holdout_every):
        raise LlmtuneError("A sweep compares trials by their evaluations: give the recipe evaluation data and "
                           "training.eval_every (a number of steps or 'epoch').")
    make_out_folder(sweep.out)
    if sweep.stop_seconds is None and recipe.training.stop_grace_seconds:
        # the trial exits by itself after its own grace; killing it earlier would lose the checkpoint
        sweep = dataclasses.replace(sweep, stop_seconds=recipe.training.stop_grace_seconds + 30)
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
    with _stopping_on_signals(sweep.out):
        _run_trials(study, sweep, space, metric, _logged_as(recipe.task, metric))
        return summarize(study, sweep, metric, direction)


def _run_trials(study: Any, sweep: Sweep, space: dict[str, Any], metric: str, logged_as: str) -> None:
    from optuna.trial import TrialState

    failures = 0
    while (done := _finished(study)) < sweep.trials:
        trial = study.ask(space)
        logger.info("Trial %d (%d of %d): %s", trial.number, done + 1, sweep.trials, _describe(trial.params))
        state, value, seconds = run_trial(sweep, trial, metric, logged_as)
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        logger.info("Trial %d %s%s after %.0f s", trial.number, state.name.lower(),
                    f": {metric} {value:.4f}" if value is not None else "", seconds)
        failures = failures + 1 if state == TrialState.FAIL else 0
        if failures == 3:
            raise LlmtuneError(f"Three trials in a row failed; see the .log files in {sweep.out}.")


@contextlib.contextmanager
def _stopping_on_signals(out: Path) -> Iterator[None]:
    """SIGTERM and Ctrl-C raise TrainingStopped, so that run_trial stops its trial on the way out: Python's
    default SIGTERM ends the process on the spot and leaves the trial training with no sweep to report to. A
    signal the process was started ignoring (e.g. SIGINT in a background job) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread; the caller handles its own signals
        return

    def stop(signum: int, frame: Any) -> None:
        raise TrainingStopped(
            f"Sweep stopped by {SIGNAL_NAMES[signum]}; a running trial was sent SIGTERM to save a checkpoint and stop. "
            f"Run the same command to resume: the finished trials are kept in {out / STUDY_FILE} and a new trial "
            "replaces the stopped one.", 128 + signum)

    previous = {sig: signal.getsignal(sig) for sig in SIGNAL_NAMES}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
            with matplotlib.rc_context():  # optuna switches the whole process to its ggplot style: undone after
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


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
