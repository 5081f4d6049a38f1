"""SFT quality benchmark: SmolLM2-135M-Instruct + LoRA on the Alpaca 5k subset.

Reports held-out loss and perplexity before and after (the baseline is the same model before training, in
the same run), token accuracy, how many unseen-prompt generations stop on their own, and the generations.

    .venv/bin/python benchmarks/sft_quality.py --train-samples 120 --eval-samples 40
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
PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France? Answer in one word.",
    "Write a haiku about autumn.",
    "Explain what a noun is in one sentence.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"))
    parser.add_argument("--train-samples", type=int, default=1000, help="Alpaca examples to train on (of 5,000).")
    parser.add_argument("--eval-samples", type=int, default=100, help="Held-out examples (never trained on).")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sft_quality.json"))
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from llmtune import load_recipe, train
    from llmtune.run.run_dir import library_versions

    rows = json.loads(Path(args.data).read_text())
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "train.json").write_text(json.dumps(rows[: args.train_samples]))
        (work / "eval.json").write_text(json.dumps(rows[-args.eval_samples :]))
        recipe = load_recipe(REPO / "recipes" / "smollm2_alpaca_lora.yaml", [
            "data.dataset=null", f"data.train_file={work / 'train.json'}", f"data.eval_file={work / 'eval.json'}",
            "data.validation_fraction=0", f"data.max_length={args.max_length}", f"training.epochs={args.epochs}",
            "training.gradient_accumulation=1",
            "training.eval_every=no", "training.save_every=no", f"lm.generation_prompts={json.dumps(PROMPTS)}",
            "lm.max_new_tokens=96", f"output.dir={work / 'run'}",
        ])
        start = time.perf_counter()
        metrics = train(recipe)
        wall = time.perf_counter() - start
        generations = [json.loads(x) for x in (work / "run" / "generations.jsonl").read_text().splitlines()]

    final_step = max(g["step"] for g in generations)
    before = [g for g in generations if g["step"] == 0]
    after = [g for g in generations if g["step"] == final_step]
    result = {
        "benchmark": "sft_quality",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "versions": library_versions(),
        "train_samples": args.train_samples,
        "eval_samples": args.eval_samples,
        "before": metrics["before"],
        "after": metrics["after"],
        "data": metrics["data"],
        "train_seconds": metrics["train"]["train_runtime"],
        "wall_seconds": wall,
        "stopped_before": sum(g["stopped"] for g in before),
        "stopped_after": sum(g["stopped"] for g in after),
        "generations_after": after,
    }
    table = render(result)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    return 0


def render(r: dict) -> str:
    b, a = r["before"], r["after"]
    lines = [
        f"SmolLM2-135M-Instruct + LoRA (r=16, all-linear), {r['train_samples']:,} Alpaca examples, "
        f"{r['eval_samples']} held out, {r['wall_seconds'] / 60:.1f} min",
        "",
        "| | held-out loss | perplexity | token accuracy | unseen prompts that stop |",
        "|---|---|---|---|---|",
        f"| before | {b['loss']:.3f} | {b['perplexity']:.2f} | {b.get('token_accuracy', float('nan')):.3f} | "
        f"{r['stopped_before']}/{len(PROMPTS)} |",
        f"| after | **{a['loss']:.3f}** | {a['perplexity']:.2f} | {a.get('token_accuracy', float('nan')):.3f} | "
        f"{r['stopped_after']}/{len(PROMPTS)} |",
        "",
    ]
    for g in r["generations_after"]:
        completion = g["completion"].replace("\n", " ")
        lines.append(f"- *{g['prompt']}* -> {completion[:200]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
