"""Distillation benchmark: a 6-layer MiniLM teacher and a 3-layer student on SST-2, distilled vs fine-tuned directly.

In one run, with the same 8,000 labelled training sentences (a seeded random pick of SST-2's 67,349):
  teacher   MiniLM (6 blocks) fine-tuned in full on the labels;
  direct    MiniLM with blocks 0, 2, 4 kept (model.num_layers=3; DistilBERT's way of starting a student from the
            teacher's checkpoint), fine-tuned on the labels alone;
  distilled the same 3-block student trained with task distill: alpha * T^2 * KL + (1 - alpha) * CE on the labelled
            sentences, plus 32,000 other SST-2 training sentences with their labels removed (distill.transfer_file),
            which only the teacher's logits teach: 1 epoch of 40,000 (the direct student: 3 epochs of 8,000); no
            more labels.
All are scored on the whole SST-2 dev set (872 sentences), and inference throughput of teacher and student is
measured on the dev set with the same batch size, alternating rounds, fastest kept.

    .venv/bin/python benchmarks/distill_quality.py                      # about 20 minutes on 2 CPU cores

Writes benchmarks/results/distill_quality.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--train-samples", type=int, default=8000, help="Labelled SST-2 training sentences.")
    parser.add_argument("--transfer-samples", type=int, default=32000,
                        help="Further SST-2 training sentences, labels removed, for the distilled student.")
    parser.add_argument("--epochs", type=float, default=3.0, help="Teacher epochs.")
    parser.add_argument("--student-epochs", type=float, default=3.0,
                        help="Epochs of the direct student.")
    parser.add_argument("--distill-epochs", type=float, default=1.0,
                        help="Epochs of the distilled student over labelled + transfer rows (0: as many examples as the "
                        "direct student sees).")
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=32, help="Inference batch for the throughput rounds.")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "distill_quality.json"))
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from llmtune import load_recipe, train
    from llmtune.run.run_dir import _cpu_name, library_versions

    data = Path(args.data_dir)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        header, *lines = (data / "train.tsv").read_text().splitlines()
        random.Random(0).shuffle(lines)
        labelled, transfer = lines[: args.train_samples], lines[args.train_samples:][: args.transfer_samples]
        Path(work, "train.tsv").write_text("\n".join([header, *labelled]) + "\n")
        Path(work, "transfer.tsv").write_text("\n".join([header, *transfer]) + "\n")
        common = ["data.dataset=null", "data.eval_split=null", f"data.train_file={work}/train.tsv",
                  f"data.eval_file={data / 'dev.tsv'}", "training.precision=fp32", "training.eval_every=no",
                  "training.save_every=no", "training.early_stopping_patience=null"]
        distilled_epochs = args.distill_epochs or args.student_epochs * len(labelled) / (len(labelled) + len(transfer))
        teacher = f"{work}/teacher"
        plans = {
            "teacher": [f"training.epochs={args.epochs}", f"output.dir={teacher}"],
            "direct": [f"training.epochs={args.student_epochs}", "model.num_layers=3",
                       f"output.dir={work}/direct"],
            "distilled": [f"training.epochs={distilled_epochs}", "task=distill", f"distill.teacher={teacher}",
                          f"distill.transfer_file={work}/transfer.tsv",
                          "model.num_layers=3",
                          f"distill.alpha={args.alpha}", f"distill.temperature={args.temperature}",
                          f"output.dir={work}/distilled"],
        }
        for name, extra in plans.items():
            start = time.perf_counter()
            metrics = train(load_recipe(REPO / "recipes" / "sst2_minilm_full.yaml", [*common, *extra]))
            results[name] = {"dev_accuracy": metrics["after"]["accuracy"], "dev_f1": metrics["after"]["f1"],
                             "wall_seconds": round(time.perf_counter() - start, 1)}
        speed = throughput({"teacher": teacher, "distilled": f"{work}/distilled"}, data / "dev.tsv", args.batch_size)
    for name, per_second in speed.items():
        results[name]["dev_sentences_per_second"] = per_second
    results["distilled"]["speedup_vs_teacher"] = round(speed["distilled"] / speed["teacher"], 2)
    report = {"machine": f"{_cpu_name()}, {os.cpu_count()} CPU threads", "settings": vars(args), "results": results,
              "versions": library_versions()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{report['machine']}; {args.train_samples:,} labelled SST-2 sentences (+ {args.transfer_samples:,} "
          f"unlabelled for the distilled student); teacher {args.epochs:g} epoch(s); alpha {args.alpha}, "
          f"T {args.temperature}; whole dev set (872)\n")
    print("| model | blocks | dev accuracy | dev macro-F1 | train wall time | dev sentences/s (batch "
          f"{args.batch_size}) |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        rate = r.get("dev_sentences_per_second")
        print(f"| {name} | {6 if name == 'teacher' else 3} | {r['dev_accuracy']:.4f} | {r['dev_f1']:.4f} | "
              f"{r['wall_seconds']:.0f} s | {f'{rate:.0f}' if rate else '-'} |")
    print(f"\nstudent speed-up: {results['distilled']['speedup_vs_teacher']}x; wrote {args.out}")
    return 0


def throughput(runs: dict[str, str], dev: Path, batch_size: int, rounds: int = 5) -> dict[str, float]:
    """Dev sentences per second for each run, in alternating rounds on the same batches; the fastest round kept."""
    from llmtune.inference.classifier import Classifier

    sentences = [line.split("\t")[0] for line in dev.read_text().splitlines()[1:]]
    models = {name: Classifier.load(path) for name, path in runs.items()}
    best = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, classifier in models.items():
            start = time.perf_counter()
            classifier.logits(sentences, batch_size=batch_size)
            best[name] = max(best[name], round(len(sentences) / (time.perf_counter() - start), 1))
    return best



if __name__ == "__main__":
    raise SystemExit(main())
