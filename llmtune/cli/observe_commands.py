"""The commands that look at runs rather than make them: report, plan, sweep (and their argument parsers)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_observe_commands(commands: Any) -> None:
    report = commands.add_parser(
        "report", help="(Re)build a run's report.html and plots, or compare several runs.",
        description="One run: rebuild RUN/report.html and RUN/plots/*.png from its trainer_state.json, metrics.json "
        "and run.json. Several runs: overlay their curves and tabulate their final metrics in --out.")
    report.add_argument("runs", nargs="+", help="Run directories.")
    report.add_argument("--out", default="runs/compare", help="Folder for a comparison of several runs.")
    report.set_defaults(handler=_report)

    plan = commands.add_parser(
        "plan", help="Estimate a recipe's memory and time before training it.",
        description="Build the recipe's model and data (nothing is written), print parameters, a per-device memory "
        "breakdown for the longest rows in one batch, dataset tokens and steps, then time real training steps and "
        "eval passes on the run's own largest and median batches and predict peak memory and the run's duration. "
        "With --device-memory, say whether it fits and which setting helps most.")
    plan.add_argument("recipe", help="Path of a YAML recipe.")
    plan.add_argument("overrides", nargs="*", help="Recipe overrides such as training.batch_size=8.")
    plan.add_argument("--device-memory", help="Memory of one device, e.g. 24GB or 16GiB (default: not checked).")
    plan.add_argument("--no-dry-run", action="store_true", help="Only the estimate: no measured steps.")
    plan.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    plan.set_defaults(handler=_plan)

    sweep = commands.add_parser(
        "sweep", help="Search hyperparameters with Optuna; each trial is an ordinary run.",
        description="Search the recipe's sweep.space (or --space FILE) with Optuna's TPE sampler and median pruning. "
        "Each trial is `llmtune train` in its own process and run directory under --out; the study is kept in "
        "--out/study.db, so the same command resumes a killed sweep. Ends with trials.md, sweep.json, plots and "
        "best_recipe.yaml.")
    sweep.add_argument("recipe", help="Path of a YAML recipe.")
    sweep.add_argument("overrides", nargs="*", help="Recipe overrides applied to every trial.")
    sweep.add_argument("--trials", type=int, help="Finished trials to reach (default: sweep.trials).")
    sweep.add_argument("--space", help="YAML file with the sweep section (space, metric, direction, trials, pruning).")
    sweep.add_argument("--out", help="Sweep folder (default: runs/sweep-<recipe name>).")
    sweep.add_argument("--accelerate", metavar="CONFIG", help="Launch every trial under accelerate with this config.")
    sweep.set_defaults(handler=_sweep)


def _report(args: argparse.Namespace) -> int:
    from llmtune import api

    print(f"Report: {api.report(args.runs, args.out)}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from llmtune.config.loader import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from llmtune import api

    plan = api.plan(recipe, args.device_memory, dry_run=not args.no_dry_run)
    if args.json:
        print(json.dumps({**plan.__dict__, "predicted_peak_bytes": plan.predicted_peak_bytes, "fits": plan.fits},
                         indent=2))
    else:
        from llmtune.observe.plan import format_plan

        print(format_plan(plan))
    return 0 if plan.fits is not False else 1


def _sweep(args: argparse.Namespace) -> int:
    from llmtune import api
    from llmtune.observe.sweep import trials_table

    result = api.sweep(args.recipe, args.overrides, args.trials, args.space, args.out, args.accelerate)
    print(trials_table(result["trials"], result["metric"]))
    if "best" in result:
        print(f"best: trial {result['best']['trial']}, {result['metric']} {result['best'][result['metric']]:.4f}; "
              f"recipe {result['best_recipe']}")
    print(f"Sweep folder: {result['out']}")
    return 0
