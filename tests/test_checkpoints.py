"""Complete-only checkpoints, rotation, resume comparisons and the SIGTERM grace timer, on folders and objects
(no training): the rules the fault tests then exercise with real processes."""

from __future__ import annotations

import json
import signal
import time

import pytest

from llmtune.errors import LlmtuneError
from llmtune.run.callbacks import StopOnSignal
from llmtune.run.checkpoints import MARKER, mark_complete, newest_complete, prepare_resume, rotate, why_incomplete
from llmtune.run.run_dir import changed_settings


def checkpoint(run_dir, step: int, complete: bool = True):
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "optimizer.pt").write_bytes(b"x" * 100)
    (folder / "trainer_state.json").write_text("{}")
    if complete:
        mark_complete(folder)
    return folder


@pytest.fixture()
def run_dir(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"checkpoint_marker": MARKER}))
    return folder


def test_a_checkpoint_counts_only_when_its_files_are_whole(run_dir):
    folder = checkpoint(run_dir, 4)
    assert why_incomplete(folder) is None
    (folder / "optimizer.pt").write_bytes(b"x" * 40)  # cut short after the marker was written
    assert why_incomplete(folder) == "optimizer.pt has 40 of its 100 bytes"
    (folder / "optimizer.pt").unlink()
    assert why_incomplete(folder) == "optimizer.pt is missing"
    unmarked = checkpoint(run_dir, 8, complete=False)
    assert "no llmtune_checkpoint.json" in why_incomplete(unmarked)
    assert why_incomplete(run_dir / "checkpoint-99") == "it does not exist"


def test_runs_from_before_the_marker_trust_a_whole_trainer_state(tmp_path):
    old_run = tmp_path / "old"
    old_run.mkdir()
    (old_run / "run.json").write_text("{}")  # no checkpoint_marker: started before llmtune marked checkpoints
    assert why_incomplete(checkpoint(old_run, 2, complete=False)) is None
    (old_run / "checkpoint-2" / "trainer_state.json").write_text('{"cut')
    assert "no whole trainer_state.json" in why_incomplete(old_run / "checkpoint-2")


def test_resume_takes_the_newest_complete_checkpoint_and_removes_the_incomplete_ones_after_it(run_dir, caplog):
    checkpoint(run_dir, 2)
    checkpoint(run_dir, 4)
    checkpoint(run_dir, 6, complete=False)
    assert prepare_resume(run_dir).name == "checkpoint-4"
    assert "Skipping checkpoint-6: incomplete" in caplog.text
    assert not (run_dir / "checkpoint-6").exists() and (run_dir / "checkpoint-2").exists()


def test_resume_without_a_complete_checkpoint_says_how_to_start_over(run_dir):
    checkpoint(run_dir, 2, complete=False)
    with pytest.raises(LlmtuneError, match="no complete checkpoint.*checkpoint-2.*output.overwrite=true"):
        prepare_resume(run_dir)
    assert (run_dir / "checkpoint-2").exists()


def test_rotation_keeps_the_newest_complete_ones_and_the_best(run_dir):
    for step in (2, 4, 6, 8):
        checkpoint(run_dir, step)
    checkpoint(run_dir, 10, complete=False)  # being written right now: never touched
    rotate(run_dir, keep=2, best=str(run_dir / "checkpoint-2"))
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-2", "checkpoint-6",
                                                                    "checkpoint-8"]
    assert newest_complete(run_dir)[0].name == "checkpoint-8"


def test_resume_comparison_names_training_changes_and_ignores_the_rest():
    before = {"training": {"learning_rate": 1e-4, "log_every": 10, "max_steps": 10},
              "output": {"dir": "runs/a", "push_to_hub": None}}
    after = {"training": {"learning_rate": 5e-4, "log_every": 1, "max_steps": 10, "deterministic": False},
             "output": {"dir": "runs/b", "push_to_hub": "me/model"}}
    # deterministic is new since that run (absent from its record): it ran with the default, not a change
    assert changed_settings(before, after) == {"training.learning_rate": (1e-4, 5e-4)}


def test_sigterm_grace_ends_the_process_when_the_save_takes_too_long(monkeypatch):
    exits = []
    monkeypatch.setattr("llmtune.run.callbacks.os._exit", exits.append)
    stop = StopOnSignal(grace_seconds=0.2)
    stop._on_signal(signal.SIGTERM, None)
    assert stop.exit_code == 143
    time.sleep(0.6)
    assert exits == [143]
    stop.__exit__(None, None, None)


def test_a_second_ctrl_c_aborts_at_once_and_a_second_sigterm_changes_nothing():
    stop = StopOnSignal()
    stop._on_signal(signal.SIGTERM, None)
    stop._on_signal(signal.SIGTERM, None)  # repeated by a scheduler: the save is under way
    interrupt = StopOnSignal()
    interrupt._on_signal(signal.SIGINT, None)
    assert interrupt.exit_code == 130
    with pytest.raises(KeyboardInterrupt):
        interrupt._on_signal(signal.SIGINT, None)
