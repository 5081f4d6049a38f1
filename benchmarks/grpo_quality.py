"""GRPO learning measured, on held-out prompts scored before and after by the run itself (greedy and sampled
rewards and pass rates, distinct-n, an exact one-sided sign test over prompts; held_out.jsonl keeps every reply).

--reward constraints: the shipped recipe (SmolLM2-135M-Instruct, LoRA, Alpaca instructions with 1-2 sampled
constraints, reward = share of constraints met + a soft overlong penalty) trained for --steps.
--reward sentiment: the lifecycle composed - a MiniLM SST-2 classifier trained first, then the same recipe on
"write a one-sentence review of a <genre> film about <subject>" prompts (a fixed grid, every 4th held out) with the
classifier's probability of "positive" as the only reward.

    .venv/bin/python benchmarks/grpo_quality.py --steps 100 --held-out 300      # the README's measurement
    .venv/bin/python benchmarks/grpo_quality.py --reward sentiment --steps 60 --held-out 100
    .venv/bin/python benchmarks/grpo_quality.py --steps 20 --held-out 48        # a quick look

Prints a table and writes benchmarks/results/grpo_quality[_sentiment].json (CPU named, times included).
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
    parser.add_argument("--reward", choices=("constraints", "sentiment"), default="constraints")
    parser.add_argument("--ifeval", type=int, default=0, metavar="TOKENS",
                        help="also score IFEval (541 prompts, never trained on) before and after, greedy replies "
                             "through the chat template cut at TOKENS new tokens; 0: skip")
    parser.add_argument("--ifeval-limit", type=int, help="IFEval's first N prompts only (default: all 541)")
    parser.add_argument("--out", help="default: benchmarks/results/grpo_quality.json (_sentiment for sentiment)")
    args = parser.parse_args()
    out = Path(args.out or REPO / "benchmarks" / "results" /
               ("grpo_quality.json" if args.reward == "constraints" else "grpo_quality_sentiment.json"))

    from llmtune import api, load_recipe
    from llmtune.run.files import write_json
    from llmtune.run.run_dir import _cpu_name

    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        started = time.perf_counter()
        overrides = [f"training.max_steps={args.steps}", f"training.learning_rate={args.learning_rate}",
                     f"data.max_eval_samples={args.held_out}", "training.eval_every=no", "training.save_every=1000",
                     "eval.before_training=false", f"output.dir={run}", "output.report=false"]
        extra: dict = {}
        if args.reward == "sentiment":
            overrides, extra = sentiment_setup(Path(folder), overrides)
        metrics = api.train(load_recipe(str(REPO / "recipes" / "smollm2_grpo_constraints.yaml"), overrides))
        seconds = time.perf_counter() - started
        history = json.loads((run / "trainer_state.json").read_text())["log_history"]
        extra["examples"] = [json.loads(line) for line in (run / "held_out.jsonl").read_text().splitlines()[:8]]
        if args.ifeval:
            extra["ifeval"] = ifeval_before_after(run, args.ifeval, args.ifeval_limit)
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
    result = {"reward": args.reward, "steps": args.steps, "learning_rate": args.learning_rate, "held_out": held,
              "train_reward": train_rewards, "warnings": metrics.get("rl_warnings"), "seconds": seconds, **extra,
              "cpu": _cpu_name(), "threads": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    write_json(out, result)  # the project's writer: folders made, a crash leaves the old file
    print(f"Wrote {out}")
    return 0


def ifeval_before_after(run: Path, tokens: int, limit: int | None = None) -> dict:
    """IFEval's four accuracies for the untrained model and the trained run (its adapter unmerged)."""
    from llmtune import api

    data = REPO.parent / "shared" / "data" / "benchmarks"
    result = {"max_gen_tokens": tokens, "limit": limit}
    for name, model in (("before", "smollm2-135m-instruct"), ("after", str(run))):
        started = time.perf_counter()
        scores = api.benchmark(model, ["ifeval"], limit=limit, data_dir=data, batch_size=16, chat_template=True,
                               max_gen_tokens=tokens, out=run.parent / f"ifeval-{name}.json",
                               log_samples=True)["scores"]["ifeval"]
        result[name] = {**scores, "seconds": time.perf_counter() - started}
    for metric in ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                   "inst_level_loose_acc"):
        print(f"IFEval {metric:<24} {result['before'][metric]:8.3f} {result['after'][metric]:8.3f}")
    return result


GENRES = ["comedy", "horror", "science fiction", "romance", "western", "war", "animated", "musical", "crime",
          "fantasy", "documentary", "thriller", "family", "sports", "mystery", "historical", "superhero", "disaster",
          "spy", "coming-of-age"]
SUBJECTS = ["a lighthouse keeper", "two rival chefs", "a lost dog", "a small-town election", "a failing bank",
            "a chess prodigy", "an old train", "a space station", "a wedding", "a haunted school", "a road trip",
            "a jazz band", "twin sisters", "a stolen painting", "a long winter", "a new neighbour", "a robot nurse",
            "a fishing village", "a marathon", "a forgotten letter"]


def sentiment_setup(folder: Path, overrides: list[str]) -> tuple[list[str], dict]:
    """Trains the SST-2 classifier and writes the review prompts; returns the GRPO overrides that use them."""
    from llmtune import api, load_recipe

    data = REPO.parent / "shared" / "data" / "sst2"
    classifier = folder / "sst2"
    started = time.perf_counter()
    scores = api.train(load_recipe(str(REPO / "recipes" / "sst2_minilm_full.yaml"), [
        "data.dataset=null", f"data.train_file={data / 'train.tsv'}", f"data.eval_file={data / 'dev.tsv'}",
        "training.epochs=1", "training.max_steps=400", "training.eval_every=400", "training.save_every=400",
        "training.early_stopping_patience=null", f"output.dir={classifier}",
        "output.report=false"]))
    prompts = folder / "reviews.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write a one-sentence review of a {genre} film about "
                                                     f"{subject}."}) + "\n"
                               for genre in GENRES for subject in SUBJECTS))
    return overrides + [
        f"data.train_file={prompts}", "data.holdout_every=4", "rl.add_constraints=0", "rl.max_completion_length=48",
        f"rl.rewards=[{{classifier: {classifier}, label: positive}}]"], {
        "classifier": {"sst2_dev_accuracy": scores["after"]["accuracy"], "steps": 400,
                       "seconds": time.perf_counter() - started}, "prompts": len(GENRES) * len(SUBJECTS)}


if __name__ == "__main__":
    raise SystemExit(main())
