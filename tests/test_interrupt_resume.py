"""Ctrl-C during training leaves a resumable checkpoint, and --resume finishes the run from it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from conftest import REPO, run_cli


def test_ctrl_c_saves_checkpoint_and_resume_finishes(tiny_bert, reviews_files, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "train", "recipes/quickstart.yaml",
        f"model.name={tiny_bert}",
        f"data.train_file={reviews_files['train']}",
        f"data.eval_file={reviews_files['eval']}",
        "data.test_file=null",
        f"output.dir={run_dir}",
        "training.max_steps=300",
        "training.batch_size=4",
        "training.log_every=5",
        "training.eval_every=no",
        "training.save_every=1000",  # no scheduled checkpoint: any checkpoint comes from the Ctrl-C
        "eval.before_training=false",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "llmtune", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    deadline = time.time() + 300
    for line in process.stdout:  # wait until training really runs (a logged loss), then press Ctrl-C
        output.append(line)
        if "'loss'" in line or time.time() > deadline:
            break
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=300)
    log = "".join(output) + rest
    assert process.returncode == 130, log
    assert "--resume" in log
    checkpoints = sorted(run_dir.glob("checkpoint-*"))
    assert len(checkpoints) == 1, log
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 0 < stopped_at < 300
    assert (checkpoints[0] / "optimizer.pt").exists() and (checkpoints[0] / "trainer_state.json").exists()
    assert not (run_dir / "metrics.json").exists()  # the run is not reported as finished

    resumed = run_cli(*args, "--resume", cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 300
    assert (run_dir / "model.safetensors").exists()
