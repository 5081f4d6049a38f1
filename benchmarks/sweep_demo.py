"""A real sweep, killed once and resumed: MiniLM + LoRA on 512 SST-2 sentences, evaluated on 128 dev sentences every
4 steps, learning rate and LoRA rank searched with Optuna (median pruning).

The sweep is started with `llmtune sweep`, killed (SIGKILL, the sweep and its running trial) once its second trial
has begun, then the very same command is run again to finish it. Prints the trials table and copies the plots and
the best recipe to benchmarks/results/sweep/.

    .venv/bin/python benchmarks/sweep_demo.py            # ~10 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"
SPACE = """space:
  training.learning_rate: {log_uniform: [1.0e-5, 3.0e-3]}
  method.r: {choice: [4, 8, 16]}
metric: accuracy
"""


def main() -> int:
    results = REPO / "benchmarks" / "results" / "sweep"
    results.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        space = Path(work) / "space.yaml"
        space.write_text(SPACE)
        out = Path(work) / "sweep"
        command = [sys.executable, "-m", "llmtune", "sweep", str(REPO / "recipes" / "sst2_minilm_lora.yaml"),
                   "data.dataset=null", f"data.train_file={SST2 / 'train.tsv'}", f"data.eval_file={SST2 / 'dev.tsv'}",
                   "data.eval_split=null", "data.max_train_samples=512", "data.max_eval_samples=128",
                   "training.epochs=1", "training.batch_size=16", "training.eval_every=4", "training.save_every=no",
                   "training.early_stopping_patience=null", "--space", str(space), "--trials", "6", "--out", str(out)]
        start = time.perf_counter()
        first = subprocess.Popen(command, start_new_session=True)
        while not (out / "trial-001.log").exists():
            time.sleep(0.5)
            if first.poll() is not None:
                raise SystemExit("the sweep ended before its second trial began")
        time.sleep(5)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        print(f"killed the sweep during trial 1 after {time.perf_counter() - start:.0f} s; resuming", flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        print(done.stdout)
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            return done.returncode
        summary = json.loads((out / "sweep.json").read_text())
        summary["wall_seconds"] = round(time.perf_counter() - start)
        summary["command"] = " ".join(["llmtune", *command[3:]])
        for name in [*summary["plots"], "trials.md", "best_recipe.yaml"]:
            shutil.copy(out / name, results / name)
        (results / "sweep.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        states = [t["state"] for t in summary["trials"]]
        print(f"{states.count('complete')} complete, {states.count('pruned')} pruned, {states.count('fail')} failed "
              f"(the killed one); {summary['wall_seconds']} s in all; results in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
