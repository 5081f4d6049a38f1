"""Classifier latency on CPU: PyTorch against onnxruntime, through the same `Classifier.probabilities` call
`llmtune predict` makes (tokenizing included), on MiniLM-L6 (22.7M parameters) with SST-2 dev sentences.

Two workloads: one sentence at a time (an HTTP request) and batches of 32 (a file). Each is timed after a
warm-up; the table gives medians and onnxruntime's speed-up as a ratio measured in the same run.

    .venv/bin/python benchmarks/onnx_latency.py --repeats 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "data" / "sst2" / "dev.tsv"


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up: first-call allocations and lazy initialisation
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "onnx_latency.json"))
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmtune.inference.classifier import Classifier
    from llmtune.inference.onnx_classifier import load_onnx_classifier
    from llmtune.models.sources import resolve_model
    from llmtune.run.run_dir import _cpu_name
    from llmtune.ship.onnx_file import write_onnx

    path = resolve_model("minilm").path
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    columns = {"text": "sentence", "text_pair": None, "label": "label"}
    pytorch = Classifier(model, AutoTokenizer.from_pretrained(path), ["negative", "positive"], 64, columns,
                         "fp32", args.batch_size)
    sentences = [line.split("\t")[0] for line in DEV.read_text().splitlines()[1:]]
    batch = sentences[: args.batch_size]
    with tempfile.TemporaryDirectory() as folder:
        write_onnx(pytorch, Path(folder))
        onnx = load_onnx_classifier(Path(folder))
        rows = []
        for workload, texts in (("1 sentence", sentences[:1]), (f"batch of {len(batch)}", batch)):
            timings = {name: median_seconds(lambda c=c, t=texts: c.probabilities(t), args.repeats)
                       for name, c in (("pytorch", pytorch), ("onnxruntime", onnx))}
            rows.append({"workload": workload, **{f"{k}_ms": round(v * 1000, 2) for k, v in timings.items()},
                         "onnxruntime_speedup": round(timings["pytorch"] / timings["onnxruntime"], 2)})
    print(f"CPU: {_cpu_name()}, torch threads {torch.get_num_threads()}, {args.repeats} repeats (median)\n")
    print("| workload | PyTorch ms | onnxruntime ms | speed-up |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['workload']} | {row['pytorch_ms']} | {row['onnxruntime_ms']} | {row['onnxruntime_speedup']}x |")
    result = {"cpu": _cpu_name(), "model": "all-MiniLM-L6-v2 (sequence classification)", "max_length": 64,
              "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nWrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
