"""GRPO learning measured: the shipped recipe (SmolLM2-135M-Instruct, LoRA, Alpaca instructions with 1-2 sampled
constraints, reward = share of constraints met + a soft overlong penalty) trained for --steps, and the held-out
prompts scored before and after by the run itself (greedy and sampled pass rates, an exact one-sided sign test
over prompts; held_out.jsonl keeps every reply).

    .venv/bin/python benchmarks/grpo_quality.py --steps 100 --held-out 300      # the README's measurement
    .venv/bin/python benchmarks/grpo_quality.py --steps 20 --held-out 48        # a quick look

Prints a table and writes benchmarks/results/grpo_quality.json (CPU named, times included).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--held-out", type=int, default=300, help="held-out prompts scored before and after")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "grpo_quality.json"))
    args = parser.parse_args()

    from llmtune import api, load_recipe
    from llmtune.run.files import write_json
    from llmtune.run.run_dir import _cpu_name

    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        started = time.perf_counter()
        metrics = api.train(load_recipe(str(REPO / "recipes" / "smollm2_grpo_constraints.yaml"), [
            f"training.max_steps={args.steps}", f"training.learning_rate={args.learning_rate}",
            f"data.max_eval_samples={args.held_out}", "training.eval_every=no", "training.save_every=1000",
            "eval.before_training=false",
            f"output.dir={run}", "output.report=false"]))
        seconds = time.perf_counter() - started
        history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    held = metrics["held_out"]
    print(f"{'held-out (' + str(held['prompts']) + ' prompts)':<28} {'before':>8} {'after':>8}")
    for kind in ("greedy", "sampled"):
        for name in held["after"][kind]:
            print(f"{kind + ' ' + name:<28} {held['before'][kind][name]:8.3f} {held['after'][kind][name]:8.3f}")
    for kind, test in held["sign_test"].items():
        print(f"sign test, {kind}: {test['rose']} rose, {test['fell']} fell, p = {test['p_value']:.3g}")
    train_rewards = [h["reward"] for h in history if "reward" in h]
    print(f"training reward, first and last log: {train_rewards[0]:.3f} -> {train_rewards[-1]:.3f}; "
          f"{seconds / 60:.1f} min in all ({args.steps} steps)")
    result = {"steps": args.steps, "learning_rate": args.learning_rate, "held_out": held,
              "train_reward": train_rewards, "warnings": metrics.get("rl_warnings"), "seconds": seconds,
              "cpu": _cpu_name(), "threads": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    write_json(Path(args.out), result)  # the project's writer: folders made, a crash leaves the old file
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
