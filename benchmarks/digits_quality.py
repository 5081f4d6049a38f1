"""Handwritten digits benchmark: the shipped MNIST recipes (a CNN and an MLP from zero) on the fixed split.

Trains recipes/mnist_cnn_scratch.yaml and recipes/mnist_mlp_scratch.yaml on the 8,000 training digits and scores
the final model (no checkpoint is picked by its held-out score) on the 2,000 held-out digits (index % 5 == 4 of
MNIST's 10,000 test images). The baseline in the same run is each model before training (chance, ~10%).

    .venv/bin/python benchmarks/digits_quality.py                # about 3 minutes on 2 CPU cores

Writes benchmarks/results/digits_quality.json and .md (accuracy, macro-F1, wall time, confusion matrices).
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
RECIPES = {"cnn": "mnist_cnn_scratch.yaml", "mlp": "mnist_mlp_scratch.yaml"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "digits_quality.json"))
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from llmtune import load_recipe, train
    from llmtune.run.run_dir import _cpu_name, library_versions

    rows = {}
    for name in args.models:
        with tempfile.TemporaryDirectory() as work:
            recipe = load_recipe(REPO / "recipes" / RECIPES[name], [
                f"data.dataset={args.data_dir}", "training.save_every=no", f"output.dir={work}/run"])
            start = time.perf_counter()
            metrics = train(recipe)
            wall = time.perf_counter() - start
        rows[name] = {"recipe": RECIPES[name], "epochs": recipe.training.epochs,
                      "accuracy_before": metrics["before"]["accuracy"], "accuracy": metrics["after"]["accuracy"],
                      "macro_f1": metrics["after"]["f1"], "train_seconds": round(metrics["train"]["train_runtime"], 1),
                      "wall_seconds": round(wall, 1), "confusion_matrix": metrics["eval_details"]["confusion_matrix"]}
    machine = f"{_cpu_name()}, {os.cpu_count()} CPU threads"
    lines = [f"{machine}; 8,000 training digits, 2,000 held out (MNIST test set, index % 5 == 4)", "",
             "| model | recipe | epochs | accuracy before | held-out accuracy | macro-F1 | wall time |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['recipe']} | {r['epochs']:g} | {r['accuracy_before']:.3f} | **{r['accuracy']:.4f}** "
                     f"| {r['macro_f1']:.4f} | {r['wall_seconds'] / 60:.1f} min |")
    for name, r in rows.items():
        lines += ["", f"Confusion matrix, {name} (rows: true digit 0-9, columns: predicted 0-9):", "",
                  "| | " + " | ".join(map(str, range(10))) + " |", "|---" * 11 + "|"]
        lines += [f"| **{i}** | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(r["confusion_matrix"])]
    table = "\n".join(lines)
    print("\n" + table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "results": rows, "versions": library_versions()},
                                         indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
