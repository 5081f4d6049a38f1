"""Seeing a run: the console a non-terminal run prints, and the report (plots of exactly what the Trainer logged,
a confusion matrix, a self-contained HTML page), for one run and for several compared."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli, run_main

from llmtune import load_recipe, train
from llmtune.errors import LlmtuneError
from llmtune.observe.report import curve_figure, curves, write_comparison, write_report


def tiny_recipe(tiny_bert: str, files: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return [
        "recipes/quickstart.yaml", f"model.name={tiny_bert}", f"data.train_file={files['train']}",
        f"data.eval_file={files['eval']}", f"data.test_file={files['test']}", f"output.dir={run_dir}",
        "training.epochs=2", "training.learning_rate=1e-3", "training.log_every=1", *extra,
    ]


@pytest.mark.slow  # a fresh CLI process
def test_a_run_piped_to_a_file_prints_plain_lines_and_no_library_noise(tiny_bert, reviews_files, tmp_path):
    done = run_cli("train", *tiny_recipe(tiny_bert, reviews_files, tmp_path / "run",
                                         "training.early_stopping_patience=1"), timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "\r" not in out  # no progress bar redrawn in a log file
    assert "{'" not in out  # no raw Trainer dict
    assert "Warning" not in out and "LOAD REPORT" not in out  # no FutureWarning, no early-stopping complaint
    assert "New head, initialised at random (not in the checkpoint): classifier." in out
    assert "step 8/8  loss " in out and " samples/s  eta " in out  # 64 rows / batch 16 x 2 epochs
    assert "eval (step 4): loss " in out and "eval (after training): loss " in out
    table = out[out.index("metric "):]
    assert "before" in table and "after" in table and "accuracy" in table
    assert f"Run saved in {tmp_path / 'run'}" in out


@pytest.fixture(scope="module")
def reported_run(tiny_bert, tmp_path_factory) -> Path:
    """A tiny classification run (with its report), shared by the report tests."""
    folder = tmp_path_factory.mktemp("reported")
    source = REPO / "recipes" / "data" / "reviews"
    files = {}
    for name, rows in (("train", 64), ("eval", 32), ("test", 8)):
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("\n".join((source / f"{name}.jsonl").read_text().splitlines()[:rows]) + "\n")
    argv = tiny_recipe(tiny_bert, files, folder / "run")
    train(load_recipe(argv[0], argv[1:]))
    return folder / "run"


def test_the_report_plots_exactly_the_logged_history(reported_run):
    run_dir = reported_run
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    plots = {p.name for p in (run_dir / "plots").glob("*.png")}
    assert {"loss.png", "learning_rate.png", "grad_norm.png", "throughput_samples_per_second.png",
            "eval_accuracy.png", "eval_f1.png", "confusion_matrix.png"} <= plots
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(plots) and "<h2>Per class" in page

    # The plotted points are the Trainer's log history, one point per logged value.
    series = curves(history)
    figure = curve_figure({"run": series}, ["loss", "eval_loss"], "Loss", "loss")
    train_line, eval_line = figure.axes[0].lines
    logged = [(h["step"], h["loss"]) for h in history if "loss" in h]
    assert [tuple(p) for p in train_line.get_xydata()] == logged and len(logged) == 8
    assert [tuple(p) for p in eval_line.get_xydata()] == [(h["step"], h["eval_loss"]) for h in history
                                                           if "eval_loss" in h]
    details = json.loads((run_dir / "metrics.json").read_text())["eval_details"]
    assert sum(map(sum, details["confusion_matrix"])) == 32  # every eval row counted once
    assert details["per_class"]["positive"]["support"] + details["per_class"]["negative"]["support"] == 32


def test_the_report_renders_in_a_headless_browser(reported_run, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from report_screenshot import find_browser, screenshot

    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium/Chrome installed to render report.html (apt-get install chromium)")
    seen = screenshot(reported_run / "report.html", tmp_path / "page.png", browser)
    assert seen["distinct_colours"] > 50 and seen["plot_blue_pixels"] > 500, seen  # a page with plots on it


@pytest.mark.slow  # two runs and a fresh CLI process
def test_several_runs_are_compared_in_one_report(tiny_bert, reviews_files, tmp_path):
    for name, rate, report in (("slow", "1e-4", "true"), ("fast", "1e-3", "false")):
        argv = tiny_recipe(tiny_bert, reviews_files, tmp_path / name, f"training.learning_rate={rate}",
                           f"output.report={report}")
        train(load_recipe(argv[0], argv[1:]))
    assert not (tmp_path / "fast" / "report.html").exists()  # output.report=false: drawn later, on request
    done = run_main("report", str(tmp_path / "fast"))
    assert done.returncode == 0 and (tmp_path / "fast" / "report.html").is_file(), done.stderr
    page = write_comparison([tmp_path / "slow", tmp_path / "fast"], tmp_path / "both").read_text()
    assert page.count("<td>slow</td>") >= 5 and page.count("<td>fast</td>") >= 5


def test_report_of_a_folder_without_a_run_says_so(tmp_path):
    with pytest.raises(LlmtuneError, match="trainer_state.json"):
        write_report(tmp_path)


@pytest.mark.slow  # tensorboard's reader imports a large stack
def test_tensorboard_events_in_the_run_hold_the_logged_losses(tiny_bert, reviews_files, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    argv = tiny_recipe(tiny_bert, reviews_files, run_dir, "training.report_to=[tensorboard]")
    train(load_recipe(argv[0], argv[1:]))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    logged = [(h["step"], h["loss"]) for h in history if "loss" in h]
    scalars = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert scalars == [(step, pytest.approx(loss, rel=1e-6)) for step, loss in logged] and len(logged) == 8
    assert "eval/accuracy" in events.Tags()["scalars"]


@pytest.mark.parametrize("trackers, message", [
    ("[tensorbord]", 'Did you mean "tensorboard"'),
    ("[swanlab]", "pip install swanlab"),
])
def test_an_unknown_or_missing_tracker_is_refused_before_anything_loads(trackers, message, tmp_path):
    with pytest.raises(LlmtuneError, match=message):
        load_recipe("recipes/quickstart.yaml", [f"training.report_to={trackers}", f"output.dir={tmp_path}/run"])
    assert not (tmp_path / "run").exists()


def plan_args(tiny_bert: str, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["plan", "recipes/quickstart.yaml", f"model.name={tiny_bert}", f"data.train_file={files['train']}",
            f"data.eval_file={files['eval']}", f"output.dir={out}", *extra]


def test_plan_breaks_memory_down_measures_two_steps_and_writes_nothing(tiny_bert, reviews_files, tmp_path, capsys):
    from llmtune.cli import main

    assert main([*plan_args(tiny_bert, reviews_files, tmp_path / "run"), "--device-memory", "64GB", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "run").exists()
    assert full["parameters"]["trainable"] == full["parameters"]["total"] > 0
    assert full["steps"] == {"optimizer_steps": 12, "micro_batches_per_step": 1, "evaluations": 5}  # 64 rows / 16 x 3
    assert full["tokens"]["train"] > 64 * 5 and full["tokens"]["longest"] >= full["tokens"]["mean"]
    assert full["measured_peak_bytes"] > full["memory"]["weights (float32)"] and full["step_seconds"] > 0
    assert full["fits"] is True and full["time_seconds"] > 0
    memory = full["memory"]
    assert memory["optimizer state"] == 2 * memory["gradients"] == 2 * memory["weights (float32)"]  # AdamW, fp32
    assert memory["activations with checkpointing"] < memory["activations"]

    assert main([*plan_args(tiny_bert, reviews_files, tmp_path / "run", "method.type=lora"), "--no-dry-run",
                 "--json"]) == 0
    lora = json.loads(capsys.readouterr().out)
    assert lora["parameters"]["trainable"] < full["parameters"]["trainable"] / 5
    assert lora["memory"]["optimizer state"] < full["memory"]["optimizer state"] / 5
    assert lora["measured_peak_bytes"] is None


def test_plan_says_plainly_when_a_recipe_will_not_fit_and_what_helps(tiny_bert, reviews_files, tmp_path, capsys):
    from llmtune.cli import main

    assert main([*plan_args(tiny_bert, reviews_files, tmp_path / "run"), "--device-memory", "1MB"]) == 1
    out = capsys.readouterr().out
    assert "will NOT fit in 1 MiB" in out and "measured" not in out  # too big to try
    advice = [line for line in out.splitlines() if line.startswith("  try ")]
    assert advice[0].startswith("  try method.type=lora: saves about")  # full fine-tuning: gradients + Adam state
    assert any("training.gradient_checkpointing=true" in line for line in advice)


def test_the_sweeps_plots_leave_matplotlibs_style_as_it_was(tmp_path):
    """optuna's matplotlib plots switch the whole process to the ggplot style; after a sweep in a notebook (or a
    test), run reports would be drawn in it. The sweep's plots undo it."""
    import matplotlib
    import optuna

    from llmtune.observe.sweep import _plots

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1) + trial.suggest_float("y", 0, 1), n_trials=3)
    before = dict(matplotlib.rcParams)
    assert "optimization_history.png" in _plots(study, tmp_path)
    changed = {k: v for k, v in matplotlib.rcParams.items() if before[k] != v and not k.startswith("backend")}
    assert changed == {}  # (the Agg backend it picks is meant: no screen needed)


def test_the_median_pruner_stops_a_trial_whose_evaluations_lag_behind(tmp_path):
    import optuna

    from llmtune.observe.sweep_trials import _report

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for good in (0.8, 0.9):
        trial = study.ask()
        trial.report(good, 4)
        study.tell(trial, good)
    evaluations = tmp_path / "evaluations.jsonl"
    evaluations.write_text(json.dumps({"step": 0, "split": "eval", "accuracy": 0.5}) + "\n")
    trial = study.ask()
    assert _report(trial, evaluations, "accuracy", 0) == (1, False)  # step 0 (untrained) is not reported
    with evaluations.open("a") as handle:
        handle.write(json.dumps({"step": 4, "split": "eval", "accuracy": 0.6}) + "\n" + '{"step": 8, "accu')  # half a line
    assert _report(trial, evaluations, "accuracy", 1) == (2, True)
    assert study.trials[-1].intermediate_values == {4: 0.6}


@pytest.mark.slow  # four trials in their own processes, one sweep killed
def test_a_killed_sweep_resumes_with_the_same_command_and_writes_the_best_recipe(tiny_bert, reviews_files, tmp_path):
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    out = tmp_path / "sweep"
    space = tmp_path / "space.yaml"
    space.write_text("space:\n  training.learning_rate: {log_uniform: [1e-5, 1e-2]}\n  training.warmup: "
                     "{uniform: [0.0, 0.2]}\nmetric: accuracy\n")
    argv = ["sweep", *tiny_recipe(tiny_bert, reviews_files, tmp_path / "unused", "training.eval_every=2"),
            "--space", str(space), "--trials", "2", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "llmtune", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("trial-001/run.json"))) == 0:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep and its running trial die mid-run
    first.wait()
    with sqlite3.connect(out / "study.db") as db:
        assert db.execute("select count(*) from trials where state = 'RUNNING'").fetchone() == (1,)

    done = run_cli(*argv, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "sweep.json").read_text())
    states = [t["state"] for t in result["trials"]]
    assert states.count("fail") == 1 and states.count("complete") + states.count("pruned") == 2
    assert "Trial 1 was running when the sweep stopped" in done.stderr
    best = load_recipe(out / "best_recipe.yaml", [])
    assert best.training.learning_rate == pytest.approx(result["best"]["params"]["training.learning_rate"])
    assert {"optimization_history.png", "param_importances.png"} <= set(result["plots"])
    assert (out / "trials.md").read_text().count("\n") == 5  # header, rule, three trials
