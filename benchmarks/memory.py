"""Memory and speed of full fine-tuning vs LoRA vs QLoRA (4-bit) vs 8-bit LoRA on one SmolLM2-135M workload.

Each method trains in a fresh process through llmtune's own SFT pipeline (same data, sequence length, batch
and steps). Peak memory is the process's peak resident memory while training (CPU: VmHWM, reset after the
model is loaded, so it includes the Python process itself; GPU: torch's peak allocated memory); the weights'
own size as stored (4-bit / 8-bit packed) is listed too.
LoRA rows adapt every linear layer (r=16) and, like full, use 32-bit AdamW; one row shows full fine-tuning
with 8-bit AdamW. Tokens/s counts trained (non-padding) tokens over the timed steps, after one warm-up step. Ratios are against
full fine-tuning measured in the same run.

    .venv/bin/python benchmarks/memory.py                 # all methods, ~10 minutes on 2 CPU cores
    .venv/bin/python benchmarks/memory.py --steps 3 --methods full qlora
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from transformers import TrainerCallback  # noqa: E402 - after the offline switches
from worker import peak_rss_mb, reset_peak_rss, run_in_fresh_process  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "full": ["method.type=full", "method.quantization=none", "training.optimizer=adamw"],
    "full + 8-bit AdamW": ["method.type=full", "method.quantization=none", "training.optimizer=adamw_8bit"],
    "lora": ["method.type=lora", "method.quantization=none", "training.optimizer=adamw"],
    "qlora (4-bit nf4)": ["method.type=lora", "method.quantization=4bit", "training.optimizer=adamw"],
    "lora on 8-bit base": ["method.type=lora", "method.quantization=8bit", "training.optimizer=adamw"],
}
SHORT = {"full": "full", "full8": "full + 8-bit AdamW", "lora": "lora", "qlora": "qlora (4-bit nf4)",
         "8bit": "lora on 8-bit base"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"))
    parser.add_argument("--methods", nargs="+", default=list(SHORT), choices=list(SHORT))
    parser.add_argument("--steps", type=int, default=5, help="Timed optimizer steps (after one warm-up step).")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "memory.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one method in this process
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args)))
        return 0

    results = []
    for short in args.methods:
        name = SHORT[short]
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        result = run_in_fresh_process([__file__, "--worker", short, "--steps", str(args.steps), "--data", args.data,
                                       "--max-length", str(args.max_length), "--batch-size", str(args.batch_size)])
        if result is None:
            return 1
        results.append({"method": name, **result})

    baseline = next((r for r in results if r["method"] == "full"), results[0])
    for r in results:
        r["peak_vs_full"] = round(r["peak_train_mb"] / baseline["peak_train_mb"], 3)
        r["speed_vs_full"] = round(r["tokens_per_s"] / baseline["tokens_per_s"], 3)
    table = render(results, baseline["method"], args)
    print(table)
    from llmtune.run.files import write_json, write_text
    from llmtune.run.run_dir import library_versions

    write_json(Path(args.out), {"settings": vars(args) | {"worker": None}, "results": results,
                                "versions": library_versions()})
    write_text(Path(args.out).with_suffix(".md"), table + "\n")
    return 0


def render(results: list[dict], baseline: str, args: argparse.Namespace) -> str:
    lines = [f"SmolLM2-135M-Instruct, Alpaca, {args.batch_size} x {args.max_length} tokens per step (packed), "
             f"{args.steps} timed steps; ratios vs {baseline}.", "",
             "| method | trainable params | weights (MB) | peak while training (MB) | peak vs full "
             "| tokens/s | speed vs full |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['weights_mb']:.0f} | {r['peak_train_mb']:.0f} | "
                     f"{r['peak_vs_full']:.2f}x | {r['tokens_per_s']:.0f} | {r['speed_vs_full']:.2f}x |")
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> dict:
    import torch

    from llmtune import build_trainer, load_recipe
    from llmtune.models.adapters import parameter_summary

    on_gpu = torch.cuda.is_available()
    rows = [r for r in json.loads(Path(args.data).read_text()) if r["output"]][: 64 * args.batch_size]
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "train.json").write_text(json.dumps(rows))
        recipe = load_recipe(REPO / "recipes" / "smollm2_alpaca_qlora.yaml", [
            "data.dataset=null", f"data.train_file={Path(work) / 'train.json'}", "data.validation_fraction=0",
            f"data.max_length={args.max_length}", f"training.batch_size={args.batch_size}",
            "training.gradient_accumulation=1", f"training.max_steps={args.steps + 1}", "training.eval_every=no",
            "training.save_every=no", "training.log_every=1", "lm.generation_prompts=[]",
            "eval.before_training=false", f"output.dir={Path(work) / 'run'}", *METHODS[SHORT[args.worker]],
        ])
        trainer = build_trainer(recipe)
        weights_mb = trainer.model.get_memory_footprint() / 2**20  # parameters + buffers, as stored
        clock = StepClock()
        trainer.add_callback(clock)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        trainer.train()
        peak_mb = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else peak_rss_mb()
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    timed_tokens = tokens[-1] - tokens[0]  # tokens of steps 2..N+1 (step 1 is the warm-up)
    return {"trainable": parameter_summary(trainer.model)["trainable"], "weights_mb": round(weights_mb, 1),
            "peak_train_mb": round(peak_mb, 1), "tokens_per_s": round(timed_tokens / clock.timed_seconds(), 1),
            "seconds_per_step": round(clock.timed_seconds() / args.steps, 2), "device": "cuda" if on_gpu else "cpu"}


class StepClock(TrainerCallback):
    """Wall-clock time at the end of every optimizer step."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def timed_seconds(self) -> float:
        return self.ends[-1] - self.ends[0]


if __name__ == "__main__":
    sys.exit(main())
