"""SST-2 quality benchmark: MiniLM full fine-tuning and LoRA, dev accuracy and wall time.

Trains each shipped SST-2 recipe on a stated subset of the GLUE SST-2 training set (read from the shared
data folder) and evaluates on the whole dev set (872 sentences). The baseline in the same run is the
model before fine-tuning (fresh head) and the majority-class rate; the table shows the ratio to the latter.

    .venv/bin/python benchmarks/classification_quality.py --train-samples 20000 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
MAJORITY_RATE = 444 / 872  # SST-2 dev: 444 positive of 872


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--train-samples", type=int, default=20000, help="SST-2 training sentences (of 67,349).")
    parser.add_argument("--epochs", type=float, default=1.0)
    # bf16 autocast measured slower than fp32 for MiniLM on the 2-core CPU (about 3.9 vs 1.0 s per step).
    parser.add_argument("--precision", default="fp32", help="Training precision for both runs (fp32 or bf16).")
    parser.add_argument("--methods", nargs="+", default=["full", "lora"])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "classification_quality.json"))
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from llmtune import load_recipe, train
    from llmtune.run.run_dir import library_versions

    data = Path(args.data_dir)
    rows = []
    for method in args.methods:
        with tempfile.TemporaryDirectory() as runs:
            recipe = load_recipe(REPO / "recipes" / f"sst2_minilm_{method}.yaml", [
                "data.dataset=null",
                "data.eval_split=null",
                f"data.train_file={data / 'train.tsv'}",
                f"data.eval_file={data / 'dev.tsv'}",
                f"data.max_train_samples={args.train_samples}",
                f"training.epochs={args.epochs}",
                f"training.precision={args.precision}",
                "training.eval_every=no",
                "training.save_every=no",
                "training.early_stopping_patience=null",
                f"output.dir={runs}/run",
            ])
            start = time.perf_counter()
            metrics = train(recipe)
            wall = time.perf_counter() - start
        rows.append({
            "method": method,
            "train_samples": args.train_samples,
            "epochs": args.epochs,
            "precision": args.precision,
            "learning_rate": recipe.training.learning_rate,
            "dev_accuracy_before": metrics["before"]["accuracy"],
            "dev_accuracy": metrics["after"]["accuracy"],
            "dev_f1": metrics["after"]["f1"],
            "ratio_to_majority": metrics["after"]["accuracy"] / MAJORITY_RATE,
            "train_seconds": metrics["train"]["train_runtime"],
            "wall_seconds": wall,
        })

    table = render(rows)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "classification_quality",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "versions": library_versions(),
        "majority_rate": MAJORITY_RATE,
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    return 0


def render(rows: list[dict]) -> str:
    lines = [
        "| method | train sentences | epochs | precision | acc before | acc after | macro-F1 | x majority | wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['train_samples']:,} | {r['epochs']:g} | {r['precision']} | "
            f"{r['dev_accuracy_before']:.3f} | **{r['dev_accuracy']:.3f}** | {r['dev_f1']:.3f} | "
            f"{r['ratio_to_majority']:.2f} | {r['wall_seconds'] / 60:.1f} min |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
