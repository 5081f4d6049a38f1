"""Faults around sweep, report and plan: bad arguments are refused before any work, a stopped sweep leaves no trial
running, a damaged or missing run is explained in one paragraph."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmtune.errors import LlmtuneError, TrainingStopped
from llmtune.observe import sweep_trials as sweeping
from llmtune.observe.plan import parse_size
from llmtune.observe.report import write_comparison, write_report
from llmtune.observe.sweep import Sweep, run_sweep, run_trial

RECIPE = "recipes/quickstart.yaml"
SPACE = "sweep.space={training.learning_rate: {log_uniform: [1e-5, 1e-3]}}"


# --- sweep arguments ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("trials", [0, -1])
def test_a_sweep_of_fewer_than_one_trial_is_refused_before_anything_is_written(trials, tmp_path):
    with pytest.raises(LlmtuneError, match=rf"--trials \(or sweep.trials\) is {trials}; .*1 or more"):
        run_sweep(Sweep(RECIPE, [SPACE], tmp_path / "sweep", trials))
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_folder_under_a_file_is_refused_in_one_paragraph(tmp_path):
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(LlmtuneError, match=rf"--out '{tmp_path / 'file' / 'sweep'}' .*'{tmp_path / 'file'}' is a file"):
        run_sweep(Sweep(RECIPE, [SPACE], tmp_path / "file" / "sweep", 2))
    assert (tmp_path / "file").read_text() == "keep me"


@pytest.mark.parametrize("spec, named", [
    ('training.learning_rate: {choice: [1e-4, "abc"]}', "'abc'"),
    ("training.learning_rate: {choice: [1e-4, 3e-4, abc]}", "'abc'"),
    ("method.r: {choice: [8, 16.5]}", "16.5"),
    ("training.learning_rate: {log_uniform: [1e-5, abc]}", "'abc'"),
    ("method.r: {int: [4, abc]}", "'abc'"),
    ("method.dropout: {uniform: [0.0, 1.5]}", "1.5"),  # the high end is checked too, not only the low
    ("training.learning_rate: {choice: []}", "no values"),
])
def test_every_value_of_a_sweep_space_is_checked_against_the_recipe(spec, named, tmp_path):
    from llmtune.config.loader import load_recipe
    from llmtune.observe.sweep import distributions

    overrides = [f"sweep.space={{{spec}}}"]
    recipe = load_recipe(RECIPE, overrides)
    key = spec.split(":")[0]
    with pytest.raises(LlmtuneError, match=rf"'sweep\.space\.{key}\.\w+'.*{named}") as caught:
        distributions(recipe.sweep.space, RECIPE, overrides)
    assert "\n" not in str(caught.value)


# --- a stopped sweep stops its trial ------------------------------------------------------------------------

# A stand-in for `llmtune train`: says when it is ready, and on SIGTERM notes it (where the trainer saves its
# checkpoint) and exits 143; 'stubborn' ignores SIGTERM, as a trainer stuck in a long step would.
FAKE_TRIAL = """
import os, pathlib, signal, sys, time
folder = pathlib.Path(sys.argv[1])
def on_term(signum, frame):
    (folder / "terminated").write_text("")
    sys.exit(143)
signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[2] == "stubborn" else on_term)
(folder / "ready").write_text(str(os.getpid()))
time.sleep(120)
"""


@pytest.fixture
def fake_trials(monkeypatch, tmp_path):
    """Trials run FAKE_TRIAL; the sweep's first look at a running trial does `interrupt` (once it is ready)."""
    state = SimpleNamespace(mode="obedient", interrupt=None, folder=tmp_path)

    def command(sweep, trial, run_dir):
        return [sys.executable, "-c", FAKE_TRIAL, str(tmp_path), state.mode]

    def look(trial, evaluations, metric, seen):
        deadline = time.monotonic() + 60  # a bound on a broken test, not a timing
        while not (tmp_path / "ready").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        state.interrupt()
        return seen, False

    monkeypatch.setattr(sweeping, "trial_command", command)
    monkeypatch.setattr(sweeping, "_report", look)
    return state


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_sigterm_to_a_sweep_stops_its_running_trial_with_sigterm_first(fake_trials, tmp_path):
    fake_trials.interrupt = lambda: os.kill(os.getpid(), signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped, match="same command") as caught:
        run_sweep(Sweep(RECIPE, [SPACE], tmp_path / "sweep", 2))
    assert caught.value.exit_code == 143
    assert (tmp_path / "terminated").is_file()  # the trial was asked to save its checkpoint
    assert _gone(int((tmp_path / "ready").read_text()))
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_in_a_sweep_kills_a_trial_that_ignores_sigterm(fake_trials, tmp_path):
    def ctrl_c():
        raise KeyboardInterrupt

    fake_trials.mode, fake_trials.interrupt = "stubborn", ctrl_c
    trial = SimpleNamespace(number=0, params={})
    sweep = Sweep(RECIPE, [], tmp_path / "sweep", 1, stop_seconds=0.5)
    sweep.out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        run_trial(sweep, trial, "accuracy", "accuracy")
    assert not (tmp_path / "terminated").exists()
    assert _gone(int((tmp_path / "ready").read_text()))


@pytest.mark.slow  # three trial processes (~4 s)
def test_trials_that_finish_are_told_to_the_study_and_the_best_recipe_is_written(monkeypatch, tmp_path):
    finish = ("import json, pathlib, sys; run = pathlib.Path(sys.argv[1]); run.mkdir(parents=True); "
              "(run / 'metrics.json').write_text(json.dumps({'after': {'accuracy': 0.75}}))")
    monkeypatch.setattr(sweeping, "trial_command", lambda sweep, trial, run_dir: [sys.executable, "-c", finish,
                                                                                   str(run_dir)])
    result = run_sweep(Sweep(RECIPE, [SPACE], tmp_path / "sweep", 2))
    assert [(t["state"], t["accuracy"]) for t in result["trials"]] == [("complete", 0.75)] * 2
    assert Path(result["best_recipe"]).is_file()


def test_a_trial_with_a_damaged_metrics_file_counts_as_failed(tmp_path):
    (tmp_path / "metrics.json").write_text('{"after": {"accur')
    assert sweeping._final_metric(tmp_path / "metrics.json", "accuracy") is None
    (tmp_path / "metrics.json").write_text('{"after": {"accuracy": 0.5}}')
    assert sweeping._final_metric(tmp_path / "metrics.json", "accuracy") == 0.5


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_trial_is_stopped_when_its_sweep_is_killed_outright(tmp_path):
    import subprocess

    # A sweep process that starts a trial and waits; SIGKILL gives it no chance to stop the trial itself.
    sweep_process = f"""
import sys, time
from types import SimpleNamespace
from pathlib import Path
from llmtune.observe import sweep_trials as s
s.trial_command = lambda sweep, trial, run_dir: [sys.executable, "-c", {FAKE_TRIAL!r}, {str(tmp_path)!r}, "obedient"]
s._report = lambda trial, evaluations, metric, seen: (seen, False)
out = Path({str(tmp_path / "sweep")!r})
out.mkdir()
s.run_trial(s.Sweep("r.yaml", [], out, 1), SimpleNamespace(number=0, params={{}}), "loss", "loss")
"""
    parent = subprocess.Popen([sys.executable, "-c", sweep_process])
    deadline = time.monotonic() + 60  # bounds on a broken test, not timings
    while not (tmp_path / "ready").is_file() and time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.05)
    assert (tmp_path / "ready").is_file(), "the fake trial never started"
    parent.kill()
    parent.wait()
    while not (tmp_path / "terminated").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "terminated").is_file()


# --- report: damaged, missing and unwritable ----------------------------------------------------------------


def fake_run(folder: Path) -> Path:
    """The files a finished run's report reads, with a tiny history."""
    folder.mkdir(parents=True)
    history = [{"step": 1, "loss": 0.9, "learning_rate": 1e-4}, {"step": 2, "loss": 0.7, "learning_rate": 5e-5}]
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (folder / "metrics.json").write_text(json.dumps({"before": {"accuracy": 0.5}, "after": {"accuracy": 0.8}}))
    (folder / "run.json").write_text(json.dumps({"seed": 42, "recipe": {"task": "classification"}}))
    return folder


@pytest.mark.parametrize("name", ["trainer_state.json", "metrics.json", "run.json"])
def test_a_truncated_run_file_is_named_as_damaged(name, tmp_path):
    run = fake_run(tmp_path / "run")
    text = (run / name).read_text()
    (run / name).write_text(text[: len(text) // 2])  # what a run killed while writing it leaves
    with pytest.raises(LlmtuneError, match=rf"'{run / name}' is damaged.*killed") as caught:
        write_report(run)
    assert "\n" not in str(caught.value)
    assert not (run / "report.html").exists()


def test_a_trainer_state_without_a_history_is_named_as_damaged(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "trainer_state.json").write_text("[]")
    with pytest.raises(LlmtuneError, match="trainer_state.json' is damaged"):
        write_report(run)


def test_a_report_of_a_whole_fake_run_is_written(tmp_path):
    run = fake_run(tmp_path / "run")
    page = write_report(run).read_text()
    assert "<td>accuracy</td>" in page and (run / "plots" / "loss.png").is_file()


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "holds no llmtune run"),
    (lambda p: p.write_text("x"), "is a file, not a run folder"),
    (lambda p: (p.mkdir(), (p / "run.json").write_text("{}")), "has no trainer_state.json"),
])
def test_a_report_of_something_that_is_not_a_run_says_what_it_is(make, message, tmp_path):
    path = tmp_path / "thing"
    make(path)
    with pytest.raises(LlmtuneError, match=message):
        write_report(path)


def test_a_comparison_with_a_missing_run_writes_nothing(tmp_path):
    run = fake_run(tmp_path / "a")
    with pytest.raises(LlmtuneError, match=f"'{tmp_path / 'b'}' does not exist"):
        write_comparison([run, tmp_path / "b"], tmp_path / "compare")
    assert not (tmp_path / "compare").exists()


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_a_comparison_whose_out_folder_cannot_be_made_is_refused_before_any_work(where, tmp_path):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b")
    if where == "under_a_file":
        (tmp_path / "file").write_text("keep me")
        out = tmp_path / "file" / "compare"
    else:
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc here")
        out = Path("/proc/llmtune-compare")
    with pytest.raises(LlmtuneError, match=rf"--out '{out}'") as caught:
        write_comparison([a, b], out)
    assert "\n" not in str(caught.value)
    if where == "under_a_file":
        assert (tmp_path / "file").read_text() == "keep me"
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.html"))  # nothing was drawn


# --- plan --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["0GB", "0", "-5GB", "-0.5G", "0.0MiB"])
def test_a_device_memory_of_zero_or_less_is_refused(text):
    with pytest.raises(ValueError, match=rf"device memory must be more than 0; got '{text}'"):
        parse_size(text)


@pytest.mark.parametrize("text", ["1.2.3GB", "GB", "5 apples", "--5GB"])
def test_a_size_that_is_not_a_number_and_unit_says_how_to_write_one(text):
    with pytest.raises(ValueError, match="is not a size; write e.g. 24GB or 512MB"):
        parse_size(text)


@pytest.mark.parametrize("text, size", [("24GB", 24 * 2**30), ("512mb", 512 * 2**20), ("1.5 GiB", 1.5 * 2**30),
                                        ("16", 16 * 2**30), ("1T", 2**40)])
def test_sizes_are_read_in_powers_of_1024(text, size):
    assert parse_size(text) == size
