"""Faults a long run meets, with real processes: Ctrl-C, SIGTERM (what Slurm and Kubernetes send), kill -9 in the
middle of writing a checkpoint, a full disk. Each must leave a run that `--resume` finishes, with the numbers an
uninterrupted run gives; nothing complete may be lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli, run_main, write_jsonl, write_reviews

from llmtune.run.checkpoints import why_incomplete

pytestmark = pytest.mark.slow  # every test here trains in subprocesses


def tiny_args(tiny_bert: str, files: dict, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train", "recipes/quickstart.yaml", f"model.name={tiny_bert}", f"data.train_file={files['train']}",
        f"data.eval_file={files['eval']}", "data.test_file=null", f"output.dir={run_dir}", "training.batch_size=4",
        "training.log_every=5", *extra,
    ]


def start(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmtune", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def wait_for_output(process: subprocess.Popen, marker: str, timeout: float = 300) -> list[str]:
    """Read the process's output until a line contains `marker` (e.g. a logged loss: training really runs)."""
    lines, deadline = [], time.time() + timeout
    for line in process.stdout:
        lines.append(line)
        if marker in line or time.time() > deadline:
            break
    return lines


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_bert, tmp_path_factory) -> dict:
    """The metrics of the 200-step run the signal tests resume to, trained once for both signals."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    whole = run_main(*tiny_args(tiny_bert, write_reviews(folder), folder / "whole", "training.max_steps=200",
                               "training.eval_every=200", "training.save_every=1000"), cwd=REPO)
    assert whole.returncode == 0, whole.stderr[-3000:]
    return metrics_of(folder / "whole")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_saves_a_checkpoint_and_resume_finishes_like_an_uninterrupted_run(
        tiny_bert, reviews_files, tmp_path, sig, code, uninterrupted_run):
    args = tiny_args(tiny_bert, reviews_files, tmp_path / "run", "training.max_steps=200", "training.eval_every=200",
                     "training.save_every=1000")  # no scheduled checkpoint: any checkpoint comes from the signal
    process = start(args)
    output = wait_for_output(process, "  loss ")  # the console's first "step 5/200  loss ..." line
    process.send_signal(sig)
    rest, _ = process.communicate(timeout=300)
    log = "".join(output) + rest
    assert process.returncode == code, log
    assert "--resume" in log
    run_dir = tmp_path / "run"
    checkpoints = sorted(run_dir.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and why_incomplete(checkpoints[0]) is None, log
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 0 < stopped_at < 200
    assert not (run_dir / "metrics.json").exists()  # the run is not reported as finished
    if sig == signal.SIGINT:
        return  # both signals take the same path from here; resuming after SIGTERM is checked below

    resumed = run_cli(*args, "--resume", cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from checkpoint-{stopped_at}" in resumed.stderr
    got, expected = metrics_of(run_dir), uninterrupted_run
    assert got["train"]["global_step"] == 200
    untimed = lambda metrics: {k: v for k, v in metrics.items() if not k.endswith(("runtime", "per_second"))}  # noqa: E731
    assert untimed(got["before"]) == untimed(expected["before"])  # kept from before the interruption
    assert got["train"]["train_loss"] == pytest.approx(expected["train"]["train_loss"], rel=1e-3)  # the whole run's
    assert got["after"]["loss"] == pytest.approx(expected["after"]["loss"], rel=1e-3)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["resumes"][0]["from_checkpoint"] == f"checkpoint-{stopped_at}"


def test_sigterm_during_a_long_evaluation_ends_it_and_saves_the_checkpoint(reviews_files, tmp_path):
    """MiniLM evaluating 300 rows of 512 tokens (minutes on a CPU) after step 2. The signal lands in that
    evaluation: it must end at the next batch, and the checkpoint of step 2 be saved well inside the grace period
    - without that, the evaluation runs past the grace and the process is ended with no checkpoint at all."""
    sentences = [json.loads(line)["text"] for line in reviews_files["eval"].read_text().splitlines()]
    long_text = " ".join(sentences * 20)  # far past 512 tokens: every row is cut to max_length
    eval_file = write_jsonl(tmp_path / "long_eval.jsonl",
                            [{"text": long_text[i:], "label": ["negative", "positive"][i % 2]} for i in range(300)])
    run_dir = tmp_path / "run"
    grace = 60
    process = start(["train", "recipes/quickstart.yaml", f"data.train_file={reviews_files['train']}",
                     f"data.eval_file={eval_file}", "data.test_file=null", "data.max_length=512",
                     f"output.dir={run_dir}", "training.max_steps=50", "training.batch_size=4",
                     "training.eval_batch_size=2", "training.log_every=2", "training.eval_every=2",
                     "training.save_every=1000", "eval.before_training=false", f"training.stop_grace_seconds={grace}"])
    output = wait_for_output(process, "step 2/50")  # logged just before the evaluation at step 2 starts
    time.sleep(3)  # well inside it: each batch of two rows takes about a second
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=300)
    log = "".join(output) + rest
    assert process.returncode == 143, log[-3000:]
    assert "Evaluation at step 2 interrupted" in log and "grace of" not in log, log[-3000:]
    checkpoints = sorted(run_dir.glob("checkpoint-*"))
    assert [p.name for p in checkpoints] == ["checkpoint-2"], log[-3000:]
    assert why_incomplete(checkpoints[0]) is None
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert not any(key.startswith("eval_") for entry in state["log_history"] for key in entry)  # no partial scores
    assert "checkpoint is" in log and "--resume" in log


def test_resume_refuses_changed_training_settings_unless_forced(tiny_bert, reviews_files, tmp_path):
    args = tiny_args(tiny_bert, reviews_files, tmp_path / "run", "training.max_steps=4", "training.save_every=2",
                     "training.eval_every=no")
    first = run_main(*args, "training.max_steps=2", cwd=REPO)  # stops after its first checkpoint
    assert first.returncode == 0, first.stderr[-2000:]
    changed = run_main(*args, "--resume", "training.learning_rate=0.5", "output.report=false", cwd=REPO)
    assert changed.returncode == 2
    message = next(line for line in changed.stderr.splitlines() if line.startswith("error:"))
    assert "training.learning_rate: 0.0001 -> 0.5" in message and "training.max_steps: 2 -> 4" in message
    assert "output.report" not in message  # what a run writes at its end, not what it trains
    assert "--force" in message
    forced = run_main(*args, "--resume", "--force", "training.learning_rate=0.5", cwd=REPO)
    assert forced.returncode == 0, forced.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["resumes"][0]["changed"]["training.learning_rate"] == {"from": 0.0001, "to": 0.5}
    assert record["recipe"]["training"]["learning_rate"] == 0.5


def test_kill_9_while_saving_a_checkpoint_never_costs_more_than_that_checkpoint(reviews_files, tmp_path):
    """MiniLM (a 261 MB checkpoint, about half a second to write): kill -9 at several moments of the second save.
    Resume then continues from the newest complete checkpoint and ends where an uninterrupted run ends."""
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [json.loads(x) for x in
                                                      reviews_files["eval"].read_text().splitlines()[:16]])

    def args(run_dir: Path) -> list[str]:
        return ["train", "recipes/quickstart.yaml", f"data.train_file={reviews_files['train']}",
                f"data.eval_file={eval_file}", "data.test_file=null", f"output.dir={run_dir}", "training.max_steps=6",
                "training.save_every=2", "training.eval_every=6", "training.batch_size=8",
                "training.keep_checkpoints=1"]  # the previous checkpoint is the only one: it must survive

    reference = run_main(*args(tmp_path / "whole"), cwd=REPO)
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = metrics_of(tmp_path / "whole")
    hit_mid_save = 0
    for offset in (0.0, 0.2):  # right as the save starts, and well into it
        run_dir = tmp_path / f"killed-{offset}"
        process = start(args(run_dir))
        second = run_dir / "checkpoint-4"
        deadline = time.time() + 300
        while not second.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(offset)
        process.kill()
        process.communicate()
        hit_mid_save += why_incomplete(second) is not None
        assert why_incomplete(run_dir / "checkpoint-2") is None or why_incomplete(second) is None

        resumed = run_main(*args(run_dir), "--resume", cwd=REPO)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        got = metrics_of(run_dir)
        assert got["train"]["global_step"] == 6
        assert got["after"]["loss"] == pytest.approx(expected["after"]["loss"], rel=1e-3), offset
        assert got["after"]["accuracy"] == expected["after"]["accuracy"]
    assert hit_mid_save, "no kill landed during a save: the test did not test anything"


def mounted_tmpfs(folder: Path, megabytes: int) -> list[str] | None:
    """How to run a command with a small tmpfs at `folder`: as root, mount it here; otherwise in a user namespace
    of the command's own (`unshare`). None when neither works on this machine."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                                 capture_output=True)
        if mounted.returncode == 0:
            return []
    if shutil.which("unshare"):
        probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                    f"mount -t tmpfs -o size={megabytes}m tmpfs '{folder}' && exec \"$@\"", "sh"]
    return None


def test_a_full_disk_while_saving_is_one_clear_error_and_the_previous_checkpoint_stays(
        tiny_bert, reviews_files, tmp_path):
    """A tmpfs with room for one checkpoint of the tiny BERT (about 12 MB) but not two: the second save fails."""
    disk = tmp_path / "disk"
    wrapper = mounted_tmpfs(disk, megabytes=20)
    if wrapper is None:
        pytest.skip("no way to mount a small tmpfs here (needs root or unprivileged user namespaces)")
    try:
        run_dir = disk / "run"
        inspect = (f"import json; from llmtune.run.checkpoints import why_incomplete, list_checkpoints; "
                   f"from pathlib import Path; print('STATE', json.dumps({{p.name: why_incomplete(p) "
                   f"for p in list_checkpoints(Path('{run_dir}'))}}))")
        command = [sys.executable, "-c",
                   "import subprocess, sys; code = subprocess.call(sys.argv[1:]); "
                   f"exec({inspect!r}); sys.exit(code)",
                   sys.executable, "-m", "llmtune", *tiny_args(tiny_bert, reviews_files, run_dir,
                                                              "training.max_steps=4", "training.save_every=2",
                                                              "training.eval_every=no")]
        result = subprocess.run([*wrapper, *command], cwd=REPO, capture_output=True, text=True, timeout=600)
        message = next((line for line in result.stderr.splitlines() if line.startswith("error:")), "")
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        assert message.startswith("error: Saving checkpoint checkpoint-4"), message
        assert f"the disk holding '{run_dir}' is full (" in message, message
        assert "checkpoint-4 was removed" in message and "checkpoint-2, is intact" in message and "--resume" in message
        state = json.loads(result.stdout.split("STATE", 1)[1])
        assert state == {"checkpoint-2": None}  # complete, and the half-written checkpoint-4 is gone
    finally:
        if not wrapper:  # mounted here as root
            subprocess.run(["umount", str(disk)], capture_output=True)
