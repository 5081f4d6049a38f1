"""Preference-tuning quality on Anthropic HH-RLHF (harmless-base) pairs with SmolLM2-135M-Instruct + LoRA.

Each method trains on a seeded sample of the 1,850 training pairs and is evaluated on the fixed held-out pairs
(every 5th of 2,312: 462; ../shared/data/preference/README.md):
  dpo, orpo, simpo: preference accuracy (share of held-out pairs whose chosen reply gets the higher implicit reward,
  a tie counting half) and mean reward margin; reward: pairwise accuracy of the reward model; kto: reward margin
  (its feedback rows are unpaired).
Before training, dpo and kto are not evaluated: their policy is their reference, so every implicit reward is exactly
0 (accuracy 0.5, margin 0; tests/test_preference.py asserts it), and the table says so. orpo, simpo and reward are
evaluated before and after in the same run. The gain over 0.5 is an exact one-sided binomial (sign) test.
The recipes' learning rates suit their full 1,850 pairs; this sample trains at --learning-rate, one pair batch of 4
per step.

`--memory` instead measures the peak resident memory of a few DPO steps, each in its own process: LoRA (the
reference is the policy with adapters off), full fine-tuning with a frozen reference copy, and full fine-tuning
with reference log-probabilities computed once.

    .venv/bin/python benchmarks/preference_quality.py --train-samples 256 --max-length 128
    .venv/bin/python benchmarks/preference_quality.py --memory
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"dpo": "smollm2_hh_dpo_lora.yaml", "orpo": "smollm2_hh_orpo.yaml", "simpo": "smollm2_hh_simpo.yaml",
           "reward": "smollm2_hh_reward.yaml", "kto": "smollm2_hh_kto.yaml"}
POLICY_IS_REFERENCE = {"dpo", "kto"}  # before training: every implicit reward is 0


def sign_test(wins: int, n: int) -> float:
    """One-sided exact binomial p-value of at least `wins` successes in `n` fair coin flips."""
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


def run_method(method: str, args: argparse.Namespace, work: Path) -> dict:
    from llmtune import load_recipe, train

    recipe = load_recipe(REPO / "recipes" / RECIPES[method], [
        f"data.max_train_samples={args.train_samples}", f"data.max_length={args.max_length}",
        f"pref.max_prompt_length={args.max_length // 2}", f"training.epochs={args.epochs}",
        f"training.learning_rate={args.learning_rate}", "training.gradient_accumulation=1",
        f"eval.before_training={str(method not in POLICY_IS_REFERENCE).lower()}", "training.eval_every=no",
        "training.save_every=no", "lm.generation_prompts=[]",
        f"output.dir={work / method}",
    ])
    start = time.perf_counter()
    metrics = train(recipe)
    wall = time.perf_counter() - start
    held_out = metrics["data"]["rows"]["eval"]
    before = metrics.get("before") or {"accuracy": 0.5, "margin": 0.0, "by_construction": True}
    if method == "kto":
        before.pop("accuracy", None)
        held_out //= 2  # two feedback rows per held-out pair
    result = {"method": method, "held_out_pairs": held_out, "before": before, "after": metrics["after"],
              "train_seconds": metrics["train"]["train_runtime"], "wall_seconds": wall,
              "dropped": metrics["data"]["dropped"]}
    if "accuracy" in metrics["after"]:
        wins = round(metrics["after"]["accuracy"] * held_out)
        result["sign_test"] = {"wins": wins, "pairs": held_out, "p_value": sign_test(wins, held_out)}
    return result


def memory_case(case: str, train_samples: int) -> int:
    """Peak RSS (bytes) of a few DPO steps in a fresh process."""
    overrides = {"lora": [], "full_copy": ["method.type=full", "pref.precompute_reference=off"],
                 "full_precomputed": ["method.type=full", "pref.precompute_reference=on"]}[case]
    code = (
        "import resource, sys, tempfile\n"
        "from llmtune import load_recipe, train\n"
        f"recipe = load_recipe({str(REPO / 'recipes' / RECIPES['dpo'])!r}, {overrides!r} + ["
        f"'training.max_steps=3', 'data.max_train_samples={train_samples}', 'data.max_eval_samples=11', "
        "'training.eval_every=no', 'training.save_every=no', 'eval.before_training=false', "
        "'lm.generation_prompts=[]', 'output.dir=' + tempfile.mkdtemp() + '/run'])\n"
        "train(recipe)\n"
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split("PEAK")[-1].split()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--train-samples", type=int, default=400, help="Training pairs (of 1,850), seeded sample.")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--memory", action="store_true", help="Measure peak memory of DPO variants instead.")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "preference_quality.json"))
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from llmtune.run.run_dir import _cpu_name, library_versions

    result: dict = {"benchmark": "preference_quality", "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                "cpu": _cpu_name()},
                    "versions": library_versions()}
    if args.memory:
        result["peak_rss_bytes"] = {case: memory_case(case, 44) for case in ("lora", "full_copy", "full_precomputed")}
        lines = [f"{case:18s} {peak / 2**20:8.0f} MiB" for case, peak in result["peak_rss_bytes"].items()]
    else:
        result["methods"] = []
        with tempfile.TemporaryDirectory() as work:
            for method in args.methods:  # written after each method: a long run keeps what it finished
                result["methods"].append(run_method(method, args, Path(work)))
                _write(result, Path(args.out))
        lines = [f"{'method':8s} {'pairs':>5s} {'acc before':>10s} {'acc after':>9s} {'margin before':>13s} "
                 f"{'margin after':>12s} {'p (sign test)':>13s} {'train s':>8s}"]
        for r in result["methods"]:
            before, after = r["before"], r["after"]
            p = r.get("sign_test", {}).get("p_value")
            p_text = f"{p:.1e}" if p is not None else "-"
            mark = "*" if before.get("by_construction") else ""
            lines.append(f"{r['method']:8s} {r['held_out_pairs']:5d} {_fmt(before.get('accuracy')) + mark:>10s} "
                         f"{_fmt(after.get('accuracy')):>9s} {_fmt(before.get('margin')):>13s} "
                         f"{_fmt(after.get('margin')):>12s} {p_text:>13s} "
                         f"{r['train_seconds']:8.0f}")
        lines.append("* policy = reference before training: every implicit reward is 0 (a tie, counted as half)")
    result["peak_rss_self_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("\n".join(lines))
    _write(result, Path(args.out))
    print(f"wrote {args.out}")
    return 0


def _write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"



if __name__ == "__main__":
    sys.exit(main())
