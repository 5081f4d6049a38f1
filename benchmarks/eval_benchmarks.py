"""Benchmark evaluation measured: exactness and speed against lm-evaluation-harness's own command, and whether the
forgetting check flags a destructive fine-tune but not the README's.

    .venv/bin/python benchmarks/eval_benchmarks.py --part exactness --limit 100
    .venv/bin/python benchmarks/eval_benchmarks.py --part forgetting --limit 100
    .venv/bin/python benchmarks/eval_benchmarks.py --part published --limit 0 --tasks arc_easy,piqa

exactness: SmolLM2-135M-Instruct (fp32) on the same task files, `llmtune eval MODEL --tasks` against `lm_eval --model
hf --include_path <llmtune's task folder> --metadata '{"data_dir": ...}'`, each as a fresh process (wall time includes
imports and loading, as a user sees it); per-task scores compared and the time ratio printed.
forgetting: two LoRA SFT runs of SmolLM2 on Alpaca with eval.benchmarks - the README recipe's settings, and the same
at a destructive learning rate - and which benchmarks each run's check flags.
published: `llmtune eval` on whole files (--limit 0) or the first N items, against the lm-eval 0-shot scores
published for SmolLM2-135M-Instruct (PUBLISHED below), in standard errors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
BENCHMARKS = DATA / "benchmarks"
TASKS = ["arc_easy", "piqa", "hellaswag"]
# lm-eval 0-shot scores of SmolLM2-135M-Instruct published on a third-party model card
# (lldois/SmolLM2-135M-Reasoning-SLERP-Champion, its baseline row); the official card's numbers come from lighteval's
# prompts and are not comparable.
PUBLISHED = {("arc_easy", "acc"): 0.541, ("piqa", "acc_norm"): 0.669, ("hellaswag", "acc_norm"): 0.430}


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def lm_eval_scores(folder: Path) -> dict:
    from llmtune.measure.harness import scores

    (results,) = folder.rglob("results_*.json")
    return scores(json.loads(results.read_text()))


def exactness(limit: int, batch_size: int, work: Path) -> dict:
    from llmtune.measure.harness import TASK_DIR
    from llmtune.models.sources import resolve_model

    path = resolve_model("smollm2-135m-instruct").path
    ours_file = work / "llmtune.json"
    ours_seconds = timed([sys.executable, "-m", "llmtune", "eval", "smollm2-135m-instruct", "--tasks", ",".join(TASKS),
                          "--limit", str(limit), "--batch-size", str(batch_size), "--data-dir", str(BENCHMARKS),
                          "--out", str(ours_file)])
    theirs_seconds = timed([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                            f"pretrained={path},dtype=float32", "--device", "cpu", "--tasks", ",".join(TASKS), "--limit",
                            str(limit), "--batch_size", str(batch_size), "--include_path", str(TASK_DIR),
                            "--metadata", json.dumps({"data_dir": str(BENCHMARKS)}), "--output_path",
                            str(work / "lm_eval")])
    ours = json.loads(ours_file.read_text())["scores"]
    theirs = lm_eval_scores(work / "lm_eval")
    rows = [{"task": t, "metric": m, "llmtune": ours[t][m], "lm_eval": theirs[t][m],
             "equal": ours[t][m] == theirs[t][m], "stderr": ours[t][f"{m}_stderr"]}
            for t in TASKS for m in ("acc", "acc_norm")]
    for r in rows:
        print(f"{r['task']:<10} {r['metric']:<9} llmtune {r['llmtune']:.4f}  lm_eval {r['lm_eval']:.4f}  "
              f"+/-{r['stderr']:.4f}  {'equal' if r['equal'] else 'DIFFERENT'}")
    print(f"wall time, fresh process each: llmtune {ours_seconds:.1f} s, lm_eval {theirs_seconds:.1f} s "
          f"(lm_eval / llmtune = {theirs_seconds / ours_seconds:.2f}x)")
    return {"limit": limit, "batch_size": batch_size, "rows": rows, "llmtune_seconds": ours_seconds,
            "lm_eval_seconds": theirs_seconds, "speedup": theirs_seconds / ours_seconds}


def published(limit: int, batch_size: int, tasks: list[str], work: Path) -> dict:
    out = work / "llmtune.json"
    command = [sys.executable, "-m", "llmtune", "eval", "smollm2-135m-instruct", "--tasks", ",".join(tasks),
               "--batch-size", str(batch_size), "--data-dir", str(BENCHMARKS), "--out", str(out)]
    seconds = timed(command + (["--limit", str(limit)] if limit else []))
    ours = json.loads(out.read_text())
    rows = []
    for (task, metric), value in PUBLISHED.items():
        if task in tasks:
            score, stderr = ours["scores"][task][metric], ours["scores"][task][f"{metric}_stderr"]
            items = ours["n-samples"][task]["effective"]
            rows.append({"task": task, "metric": metric, "items": items, "llmtune": score, "stderr": stderr,
                         "published": value, "difference_in_stderr": (score - value) / stderr})
            print(f"{task:<10} {metric:<9} {items:>6} items  llmtune {score:.4f} +/-{stderr:.4f}  published "
                  f"{value:.3f}  ({rows[-1]['difference_in_stderr']:+.2f} stderr)")
    print(f"wall time {seconds:.1f} s")
    return {"limit": limit or None, "batch_size": batch_size, "rows": rows, "seconds": seconds,
            "scores": ours["scores"]}


def forgetting(limit: int, steps: int, work: Path) -> dict:
    from llmtune import api, load_recipe

    source = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())
    data = work / "alpaca.json"
    data.write_text(json.dumps(source[:1000]))
    runs = {}
    for name, extra in (("readme", []), ("destructive", ["method.type=full", "training.learning_rate=5e-3"])):
        started = time.perf_counter()
        metrics = api.train(load_recipe("recipes/smollm2_alpaca_lora.yaml", [
            "data.dataset=null", f"data.train_file={data}", f"training.max_steps={steps}", "lm.generation_prompts=[]",
            "eval.benchmarks=[arc_easy,piqa]", f"eval.benchmark_limit={limit}", f"eval.benchmark_data_dir={BENCHMARKS}",
            f"output.dir={work / name}", "output.report=false", *extra]))
        rows = metrics["benchmarks"]["forgetting"]
        runs[name] = {"rows": rows, "flagged": metrics["benchmarks"]["dropped"], "overrides": extra,
                      "held_out_loss": [metrics["before"].get("loss"), metrics["after"].get("loss")],
                      "seconds": time.perf_counter() - started}
        for r in rows:
            print(f"{name:<12} {r['task']:<9} {r['metric']:<9} {r['before']:.4f} -> {r['after']:.4f} "
                  f"({r['change']:+.4f}, 95% interval +/-{r['interval_95']:.4f}) {'FLAGGED' if r['dropped'] else ''}")
    return {"limit": limit, "steps": steps, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["exactness", "forgetting", "published"], required=True)
    parser.add_argument("--limit", type=int, default=100, help="items per task; 0: the whole files (published)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="published: the tasks to score")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="forgetting: training steps of each run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from llmtune.run.run_dir import _cpu_name

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if args.part == "exactness":
            result = exactness(args.limit, args.batch_size, work)
        elif args.part == "published":
            result = published(args.limit, args.batch_size, args.tasks.split(","), work)
        else:
            result = forgetting(args.limit, args.steps, work)
    result |= {"cpu": _cpu_name(), "threads": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    out = Path(args.out or REPO / "benchmarks" / "results" / f"eval_{args.part}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
