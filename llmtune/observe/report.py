"""A run's report: PNG plots of its curves and one self-contained `report.html` (images inline, opens offline).

Everything is read from the run directory - `trainer_state.json` (the Trainer's log history), `metrics.json`,
`run.json`, `generations.jsonl` - so `llmtune report RUN` rebuilds it at any time, and `llmtune report A B ...`
overlays several runs' curves and tabulates their final metrics.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmtune.errors import LlmtuneError
from llmtune.observe.console import is_timing
from llmtune.run.files import why_unwritable, write_text

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
# Curves of the training logs: (log key, title, y label).
TRAINING_CURVES = [
    ("learning_rate", "Learning rate", "learning rate"),
    ("grad_norm", "Gradient norm", "norm"),
    ("throughput_tokens_per_second", "Throughput", "tokens / s"),
    ("throughput_samples_per_second", "Throughput", "samples / s"),
    ("rewards/margins", "Reward margin (training batches)", "margin"),
    ("rewards/accuracies", "Preference accuracy (training batches)", "accuracy"),
    ("reward", "Reward of the sampled completions (grpo; weighted sum)", "reward"),
    ("reward_std", "Reward spread within a prompt's group (grpo)", "std"),
    ("frac_reward_zero_std", "Share of groups with no reward spread: no signal (grpo)", "share"),
    ("completions/mean_length", "Completion length (grpo)", "tokens"),
    ("completions/clipped_ratio", "Completions cut at max_completion_length (grpo)", "share"),
    ("entropy", "Policy entropy over completion tokens (grpo)", "nats"),
    ("kl", "KL to the reference (grpo, rl.beta > 0)", "KL"),
]
_FINAL = ("after_", "test_")  # evaluations after training: single numbers, in the metrics table


Series = dict[str, tuple[list[float], list[float]]]


@dataclasses.dataclass
class RunFiles:
    """What a report reads from a run directory (a missing metrics.json / run.json / generations.jsonl: empty)."""

    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    record: dict[str, Any]
    generations: list[dict[str, Any]]


def log_history(run_dir: Path) -> list[dict[str, Any]]:
    check_run_folder(Path(run_dir))
    state = _read_json(Path(run_dir) / STATE_FILE)
    if not isinstance(state.get("log_history"), list):
        raise _damaged(Path(run_dir) / STATE_FILE, "it has no 'log_history' list")
    return state["log_history"]


def read_run(run_dir: Path) -> RunFiles:
    """Every file of a run the report reads; a missing or damaged run is an LlmtuneError naming the file."""
    run_dir = Path(run_dir)
    history = log_history(run_dir)
    return RunFiles(history, _read_json(run_dir / "metrics.json"), _read_json(run_dir / "run.json"),
                    _generations(run_dir / "generations.jsonl"))


def check_run_folder(run_dir: Path) -> None:
    """The folder exists, is a folder, and holds a finished run (its trainer_state.json)."""
    if not run_dir.exists():
        parent = next((p for p in run_dir.absolute().parents if p.is_dir()), Path("."))
        runs = _runs_in(parent)
        there = f" Runs in '{parent}': {', '.join(runs)}." if runs else ""
        raise LlmtuneError(f"'{run_dir}' does not exist: there is no run folder there.{there} Give a run directory "
                           "as `llmtune train` printed it (\"Run saved in ...\").")
    if not run_dir.is_dir():
        raise LlmtuneError(f"'{run_dir}' is a file, not a run folder. Give a run directory: the folder holding the "
                           f"run's {STATE_FILE}, metrics.json and run.json.")
    if (run_dir / STATE_FILE).is_file():
        return
    if (run_dir / "run.json").is_file():
        raise LlmtuneError(f"'{run_dir}' has no {STATE_FILE}: the run did not finish (it is written when training "
                           "ends). Report one of its checkpoint-N folders, which hold the history up to their step, "
                           "or finish the run with `llmtune train RECIPE --resume`.")
    runs = _runs_in(run_dir)
    inside = f" Runs in it: {', '.join(runs)}." if runs else ""
    raise LlmtuneError(f"'{run_dir}' holds no llmtune run: it has no {STATE_FILE} or run.json.{inside} Give a run "
                       "directory as `llmtune train` printed it, or one of its checkpoint-N folders.")


def _runs_in(folder: Path) -> list[str]:
    """Up to 8 names of the runs directly in a folder, to suggest."""
    try:
        return sorted(child.name for child in folder.iterdir() if (child / STATE_FILE).is_file())[:8]
    except OSError:
        return []


def check_report_paths(run_dirs: list[Path], out: Path | None = None) -> list[RunFiles]:
    """Before anything is drawn: every run readable, and the report's folder (`out`, for a comparison; else the
    one run's own folder) writable. Returns the runs' files as read."""
    runs = [read_run(Path(d)) for d in run_dirs]
    if out is not None:
        make_out_folder(Path(out), "--out", "Give a folder that can be created and written, e.g. runs/compare.")
    else:
        make_out_folder(Path(run_dirs[0]), "The run folder", "The report is written into the run: copy the run "
                        "folder somewhere writable and report the copy.")
    return runs


def make_out_folder(out: Path, what: str = "--out", advice: str = "Give a folder that can be created and written.") -> None:
    """Create the folder results go to, after checking it can be, so a bad path is refused in one paragraph before
    any work rather than with a traceback after it."""
    problem = why_unwritable(out)
    if problem:
        raise LlmtuneError(f"{what} '{out}' cannot be written: {problem}. {advice}")
    out.mkdir(parents=True, exist_ok=True)


def _damaged(path: Path, why: str) -> LlmtuneError:
    if path.name == STATE_FILE:
        advice = ("Report one of the run's checkpoint-N folders instead (each holds the history up to its step), "
                  "or train the run again.")
    else:
        advice = f"Move it aside (e.g. rename it to {path.name}.damaged) and report again: the report is drawn without it."
    return LlmtuneError(f"'{path}' is damaged ({why}): the run was probably killed, or its disk filled up, while "
                        f"writing it. {advice}")


def curves(history: Iterable[dict[str, Any]]) -> Series:
    """Every numeric log key as a curve over steps: 'loss' (training), 'eval_loss', 'eval_accuracy', ... Entries
    are kept in log order; a key logged twice at one step (a resumed run) keeps both."""
    series: Series = {}
    for entry in history:
        step = entry.get("step")
        # The end-of-training summary and the final evaluations (whose trl scores keep an 'eval_' name) are single
        # numbers, in the metrics table, not points on a curve.
        if step is None or "train_loss" in entry or any(key.startswith(_FINAL) for key in entry):
            continue
        for key, value in entry.items():
            if key in ("step", "epoch", "total_flos") or key.startswith(_FINAL) or is_timing(key):
                continue
            if isinstance(value, int | float) and not isinstance(value, bool):
                steps, values = series.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
    return series


# --- figures -----------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    """A figure drawn by Agg into files only: no pyplot, so no display or global figure registry (also on a
    headless server, or from a thread)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def curve_figure(runs: dict[str, Series], keys: list[str], title: str, ylabel: str):
    """One figure: the given log keys (e.g. 'loss' and 'eval_loss') of every run, against the step."""
    figure = _new_figure(6.4, 3.6)
    axes = figure.add_subplot()
    for run_name, series in runs.items():
        for key in keys:
            if key in series:
                steps, values = series[key]
                label = key if len(runs) == 1 else f"{run_name}: {key}"
                axes.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 4))  # short tick labels, so fixed margins fit
    if axes.lines:
        axes.legend(fontsize=8)
    # fixed margins: tight_layout would draw every figure an extra time to measure it
    figure.subplots_adjust(left=0.14, right=0.97, top=0.9, bottom=0.15)
    return figure


def confusion_figure(labels: list[str], matrix: list[list[int]]):
    size = max(3.6, 0.5 * len(labels) + 2)
    figure = _new_figure(size, size)
    axes = figure.add_subplot()
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            axes.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    axes.set_title("Confusion matrix (evaluation after training)")
    figure.tight_layout()
    return figure


def figures(runs: dict[str, Series]) -> dict[str, Any]:
    """The report's curves, by file name: loss, each training curve the runs logged, each evaluation metric."""
    found = set().union(*(series.keys() for series in runs.values()))
    out = {}
    if found & {"loss", "eval_loss"}:
        out["loss.png"] = curve_figure(runs, ["loss", "eval_loss"], "Loss", "loss")
    for key, title, ylabel in TRAINING_CURVES:
        if key in found:
            out[f"{_file_name(key)}.png"] = curve_figure(runs, [key], title, ylabel)
    per_reward = sorted(k for k in found if k.startswith("rewards/") and k.endswith("/mean"))
    if per_reward:  # grpo: each reward function's mean over the sampled completions
        out["rewards_per_function.png"] = curve_figure(runs, per_reward, "Reward per function (grpo)", "reward")
    for runs_series_key in sorted(k for k in found if k.startswith("eval_") and k != "eval_loss"):
        name = runs_series_key.removeprefix("eval_")
        out[f"eval_{_file_name(name)}.png"] = curve_figure(runs, [runs_series_key], f"Evaluation: {name}", name)
    return out


def _file_name(key: str) -> str:
    return key.replace("/", "_")


# --- the report --------------------------------------------------------------------------------------------


def write_report(run_dir: Path) -> Path:
    """(Re)build `plots/*.png` and `report.html` in a run directory; returns the report's path."""
    run_dir = Path(run_dir)
    (run,) = check_report_paths([run_dir])
    metrics, record, generations = run.metrics, run.record, run.generations
    pictures = figures({run_dir.name: curves(run.history)})
    details = metrics.get("eval_details") or {}
    if details.get("confusion_matrix"):
        pictures["confusion_matrix.png"] = confusion_figure(details["labels"], details["confusion_matrix"])
    images = _save_figures(pictures, run_dir / PLOTS_DIR)
    sections = [_metrics_section({run_dir.name: metrics})]
    if details.get("per_class"):
        sections.append(_per_class_section(details["per_class"]))
    if metrics.get("benchmarks"):
        sections.append(_benchmarks_section(metrics["benchmarks"]))
    sections.append(_images_section(images))
    if generations:
        sections.append(_generations_section(generations))
    sections.append(_run_section(record))
    title = f"llmtune report: {run_dir.name}"
    path = run_dir / REPORT_FILE
    write_text(path, _page(title, sections))
    return path


def write_comparison(run_dirs: list[Path], out_dir: Path) -> Path:
    """Overlay the curves of several runs and tabulate their final metrics, in `out_dir`."""
    names = _unique_names(run_dirs)
    files = dict(zip(names, check_report_paths(run_dirs, Path(out_dir))))
    runs = {name: curves(run.history) for name, run in files.items()}
    images = _save_figures(figures(runs), Path(out_dir) / PLOTS_DIR)
    metrics = {name: run.metrics for name, run in files.items()}
    sections = [_metrics_section(metrics), _images_section(images)]
    path = Path(out_dir) / REPORT_FILE
    write_text(path, _page(f"llmtune: {len(run_dirs)} runs compared", sections))
    return path


def _unique_names(run_dirs: list[Path]) -> list[str]:
    names = [Path(d).name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def _save_figures(pictures: dict[str, Any], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    saved = {}
    for name, figure in pictures.items():
        path = folder / name
        partial = path.with_name(path.name + ".partial")
        figure.savefig(partial, format="png")
        partial.replace(path)  # a crash leaves the previous picture, never half of one
        saved[name] = path
    return saved


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a run file; {} when the file is missing."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise _damaged(path, f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
    except UnicodeDecodeError as exc:
        raise _damaged(path, "not text") from exc
    except OSError as exc:
        raise LlmtuneError(f"Cannot read '{path}': {exc.strerror or exc}. Check its permissions.") from exc
    if not isinstance(data, dict):
        raise _damaged(path, f"it holds a JSON {type(data).__name__}, not an object")
    return data


def _generations(path: Path) -> list[dict[str, Any]]:
    """The logged generations; a line that is not a whole record (a run killed while appending) is left out."""
    if not path.is_file():
        return []
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("Leaving the generations out of the report: cannot read %s (%s).", path, exc)
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and {"prompt", "step", "completion"} <= record.keys():
            records.append(record)
    if len(records) < len(lines):
        logger.warning("Leaving %d damaged line(s) of %s out of the report.", len(lines) - len(records), path)
    return records


def _metrics_section(runs: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, metrics in runs.items():
        before, after = metrics.get("before", {}), metrics.get("after", {})
        for key, value in after.items():
            if isinstance(value, int | float) and not is_timing(key):
                old = before.get(key)
                cells = [name, key, _cell(old), _cell(value),
                         _cell(value - old) if isinstance(old, int | float) else ""]
                rows.append(cells if len(runs) > 1 else cells[1:])
    header = ["run", "metric", "before", "after", "change"]
    return "<h2>Metrics</h2>" + _table(header if len(runs) > 1 else header[1:], rows)


def _benchmarks_section(benchmarks: dict[str, Any]) -> str:
    """The forgetting check: each benchmark before -> after with the 95% interval of the change, drops beyond it
    flagged; without a before score (eval.before_training off), the scores after training."""
    from llmtune.measure.harness import headline_metric

    rows = benchmarks.get("forgetting") or []
    if rows:
        cells = [[r["task"], r["metric"], _cell(r["before"]), _cell(r["after"]), _cell(r["change"]),
                  _cell(r["interval_95"]) if r["interval_95"] is not None else "",
                  "<b class='bad'>dropped beyond its interval</b>" if r["dropped"] else "within chance"]
                 for r in rows]
        return ("<h2>Benchmarks (forgetting check)</h2>"
                + _table(["task", "metric", "before", "after", "change", "95% interval", "verdict"], cells))
    after = benchmarks.get("after", {})
    cells = [[task, metric, _cell(row[metric])] for task, row in after.items()
             if (metric := headline_metric(row)) is not None]
    return "<h2>Benchmarks (after training)</h2>" + _table(["task", "metric", "score"], cells)


def _per_class_section(per_class: dict[str, dict[str, float]]) -> str:
    rows = [[label, _cell(v["precision"]), _cell(v["recall"]), _cell(v["f1"]), str(v["support"])]
            for label, v in per_class.items()]
    return "<h2>Per class (evaluation after training)</h2>" + _table(
        ["label", "precision", "recall", "F1", "support"], rows)


def _images_section(images: dict[str, Path]) -> str:
    tags = []
    for name, path in images.items():
        data = base64.b64encode(path.read_bytes()).decode()
        tags.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></figure>')
    return "<h2>Curves</h2><div class='grid'>" + "".join(tags) + "</div>"


def _generations_section(generations: list[dict[str, Any]]) -> str:
    """The fixed prompts' greedy replies at the first evaluation (before training) and at the last."""
    first, last = generations[0]["step"], generations[-1]["step"]
    replies: dict[str, dict[int, str]] = {}
    for record in generations:
        replies.setdefault(record["prompt"], {})[record["step"]] = record["completion"]
    rows = [[html.escape(prompt), html.escape(by_step.get(first, "")), html.escape(by_step.get(last, ""))]
            for prompt, by_step in replies.items()]
    return f"<h2>Generations (step {first} -> step {last})</h2>" + _table(["prompt", "before", "after"], rows)


def _run_section(record: dict[str, Any]) -> str:
    shown = {key: record[key] for key in ("started", "model_path", "world_size", "global_batch_size", "precision",
                                          "seed", "parameters", "versions") if key in record}
    recipe = json.dumps(record.get("recipe", {}), indent=2)
    return ("<h2>Run</h2>" + _table(["", ""], [[k, json.dumps(v)] for k, v in shown.items()])
            + f"<details><summary>Resolved recipe</summary><pre>{html.escape(recipe)}</pre></details>")


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, sections: list[str]) -> str:
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
             ".grid{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}img{max-width:640px}pre{background:#f6f6f6;padding:1em}"
             ".bad{color:#b00020}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n")
