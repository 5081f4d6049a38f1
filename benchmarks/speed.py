"""Speed benchmark: SmolLM2-135M-Instruct LoRA SFT on Alpaca through (a) llmtune's defaults, (b) a plain
transformers Trainer script written the way the transformers docs teach (chat-formatted text, tokenize,
pad per batch, labels = inputs, no packing) and (c) TRL's SFTTrainer with its defaults - same model, LoRA
settings, data, learning rate, batch size and machine, in one run.

Each system trains until it has processed the same number of effective tokens (tokens that are attended to,
padding excluded); then one shared evaluator scores every model on the same held-out Alpaca answers
(mean loss per answer token). Reported per system: effective tokens/s, step time, peak RSS, held-out loss,
and MFU = 6 x N x tokens/s / the matmul peak measured in this run (fp32). Ratios are against the plain Trainer.

    .venv/bin/python benchmarks/speed.py                      # ~15 minutes on 2 CPU cores
    .venv/bin/python benchmarks/speed.py --token-budget 4000 --systems llmtune trl
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
SYSTEMS = ("plain_trainer", "trl", "llmtune")
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"))
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--token-budget", type=int, default=12000, help="Effective tokens each system trains on.")
    parser.add_argument("--train-samples", type=int, default=400)
    parser.add_argument("--eval-samples", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "speed.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "prep":
        print(json.dumps({"seconds": prepare_data(args)}))
        return 0
    if args.worker:
        print(json.dumps(run_system(args)))
        return 0

    peak = matmul_peak()
    results = []
    with tempfile.TemporaryDirectory() as work:
        preprocessing = {}
        for label in ("cold", "cached"):  # the whole Alpaca 5k through llmtune's data path, same datasets cache
            result = run_in_fresh_process([__file__, "--worker", "prep", "--work", work, f"--data={args.data}",
                                           f"--max-length={args.max_length}"],
                                          env={**os.environ, "HF_DATASETS_CACHE": str(Path(work) / "datasets-cache")})
            if result is None:
                return 1
            preprocessing[label] = result["seconds"]
        rows = json.loads(Path(args.data).read_text())
        (Path(work) / "train.json").write_text(json.dumps(rows[: args.train_samples]))
        (Path(work) / "eval.json").write_text(json.dumps(rows[-args.eval_samples:]))
        for system in args.systems:
            print(f"running {system} ...", file=sys.stderr, flush=True)
            result = run_in_fresh_process([__file__, "--worker", system, "--work", work,
                                           *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                             if k not in ("worker", "work", "systems", "out", "data") and v is not None]])
            if result is None:
                return 1
            results.append({"system": system, **result})
    baseline = next((r for r in results if r["system"] == "plain_trainer"), results[0])
    for r in results:
        r["mfu"] = round(6 * r["parameters"] * r["tokens_per_s"] / (peak[r["precision"]] * 1e9), 4)
        r["speed_vs_plain"] = round(r["tokens_per_s"] / baseline["tokens_per_s"], 2)
    table = render(results, peak, args, preprocessing)
    print(table)
    from llmtune.runs import library_versions, write_json, write_text

    write_json(Path(args.out), {"settings": {k: v for k, v in vars(args).items() if k not in ("worker", "work")},
                                "matmul_peak_gflops": peak, "preprocessing_alpaca5k_s": preprocessing,
                                "results": results, "versions": library_versions()})
    write_text(Path(args.out).with_suffix(".md"), table + "\n")
    return 0


def render(results: list[dict], peak: dict, args: argparse.Namespace, preprocessing: dict) -> str:
    lines = [f"SmolLM2-135M-Instruct LoRA (r=16, all-linear) SFT on Alpaca, max length {args.max_length}, batch "
             f"{args.batch_size}, {args.token_budget:,} effective tokens each, {os.cpu_count()} CPU threads. Matmul "
             f"peak measured in this run: fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s; MFU is "
             "against the peak of the precision the system trained in.", "",
             "| system | effective tokens/s | vs plain Trainer | s/step | padding share | peak RSS (MB) | "
             "held-out answer loss | MFU | precision | activation checkpointing |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['system']} | {r['tokens_per_s']:.1f} | {r['speed_vs_plain']:.2f}x | "
                     f"{r['seconds_per_step']:.2f} | {r['padding_share']:.0%} | {r['peak_rss_mb']:.0f} | "
                     f"{r['held_out_loss']:.4f} | {r['mfu']:.1%} | {r['precision']} | "
                     f"{'on' if r['activation_checkpointing'] else 'off'} |")
    lines += ["", f"llmtune preprocessing of all 5,000 Alpaca examples (load, chat template, tokenize, loss masks): "
              f"cold {preprocessing['cold']:.1f} s, cached {preprocessing['cached']:.1f} s."]
    return "\n".join(lines)


def matmul_peak(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best-of-N GFLOP/s of a square matmul on this machine, in fp32 and bf16."""
    import torch

    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.matmul(a, b)
        best = min(_timed(torch.matmul, a, b) for _ in range(repeats))
        peak[name] = round(2 * size**3 / best / 1e9, 3)
    return peak


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


# --- one system, in its own process ---------------------------------------------------------------------------


class TokenCounter:
    """Wraps a data collator: counts the attended (non-padding) tokens and all token slots of every batch."""

    def __init__(self, collator):
        self.collator, self.effective, self.slots = collator, 0, 0

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch.get("attention_mask")
        self.slots += batch["input_ids"].numel()
        self.effective += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch


class Budget(TrainerCallback):
    """Stops training once the counted effective tokens reach the budget; times the steps after the first."""

    def __init__(self, counter: TokenCounter, budget: int):
        self.counter, self.budget, self.ends, self.tokens_at = counter, budget, [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        self.tokens_at.append(self.counter.effective)
        if self.counter.effective >= self.budget:
            control.should_training_stop = True
        return control


def run_system(args: argparse.Namespace) -> dict:
    import torch

    work = Path(args.work)
    start = time.perf_counter()
    trainer = {"llmtune": build_llmtune, "plain_trainer": build_plain, "trl": build_trl}[args.worker](args, work)
    preprocessing = time.perf_counter() - start
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    budget = Budget(counter, args.token_budget)
    trainer.add_callback(budget)
    reset_peak_rss()
    trainer.train()
    peak_rss = peak_rss_mb()
    steps = len(budget.ends) - 1
    seconds = budget.ends[-1] - budget.ends[0]
    tokens = budget.tokens_at[-1] - budget.tokens_at[0]
    model = trainer.model.eval()
    return {
        "tokens_per_s": round(tokens / seconds, 2),
        "seconds_per_step": round(seconds / max(steps, 1), 3),
        "steps": steps + 1,
        "effective_tokens": counter.effective,
        "padding_share": round(1 - counter.effective / max(counter.slots, 1), 3),
        "peak_rss_mb": round(peak_rss, 1),
        "held_out_loss": round(held_out_answer_loss(model, work / "eval.json", args.max_length), 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_s": round(preprocessing, 2),
        "precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32",
        "activation_checkpointing": bool(trainer.args.gradient_checkpointing),
        "threads": torch.get_num_threads(),
    }


def prepare_data(args: argparse.Namespace) -> float:
    """Seconds for llmtune's data path on the whole file: load, convert, chat template, tokenize with masks."""
    from llmtune import load_recipe
    from llmtune.tasks import causal_lm

    recipe = load_recipe(REPO / "recipes" / "smollm2_alpaca_lora.yaml", [
        "data.dataset=null", f"data.train_file={args.data}", "data.validation_fraction=0",
        f"data.max_length={args.max_length}", "output.dir=unused"])
    start = time.perf_counter()
    lm_data = causal_lm.load_data(recipe)
    tokenizer, _, _, _ = causal_lm.load_tokenizer(recipe, lm_data)
    causal_lm.tokenize_splits(recipe, lm_data, tokenizer)
    return round(time.perf_counter() - start, 2)


def _base_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtune.models.sources import resolve_model

    path = resolve_model("smollm2-135m-instruct").path
    return AutoModelForCausalLM.from_pretrained(path, dtype="float32"), AutoTokenizer.from_pretrained(path), path


def _training_args(args, work: Path, **extra):
    return dict(output_dir=str(work / "out"), per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate, num_train_epochs=100, logging_steps=1, save_strategy="no",
                eval_strategy="no", report_to="none", use_cpu=True, seed=42, **extra)


def build_llmtune(args, work: Path):
    from llmtune import load_recipe
    from llmtune.tasks import causal_lm

    recipe = load_recipe(REPO / "recipes" / "smollm2_alpaca_lora.yaml", [
        "data.dataset=null", f"data.train_file={work / 'train.json'}", "data.validation_fraction=0",
        f"data.max_length={args.max_length}", f"training.batch_size={args.batch_size}",
        "training.gradient_accumulation=1", f"training.learning_rate={args.learning_rate}", "training.epochs=100",
        "training.warmup=0", "training.scheduler=linear", "training.eval_every=no", "training.save_every=no",
        "lm.generation_prompts=[]", f"output.dir={work / 'llmtune-run'}",
    ])
    return causal_lm.build(recipe).trainer


def _alpaca_messages(row: dict) -> list[dict]:
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def build_plain(args, work: Path):
    """The transformers docs' way: chat-format the text, tokenize, pad per batch, labels = input_ids."""
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model, tokenizer, _ = _base_model()
    rows = load_dataset("json", data_files=str(work / "train.json"), split="train")

    def tokenize(row):
        text = tokenizer.apply_chat_template(_alpaca_messages(row), tokenize=False)
        return tokenizer(text, truncation=True, max_length=args.max_length)

    data = rows.map(tokenize, remove_columns=rows.column_names)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    return Trainer(model=model, args=TrainingArguments(**_training_args(args, work)), train_dataset=data,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer)


def build_trl(args, work: Path):
    """TRL's SFTTrainer with its defaults, on prompt/completion conversations."""
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model, tokenizer, _ = _base_model()
    rows = load_dataset("json", data_files=str(work / "train.json"), split="train")
    data = rows.map(lambda row: {"prompt": _alpaca_messages(row)[:1], "completion": _alpaca_messages(row)[1:]},
                    remove_columns=rows.column_names)
    config = SFTConfig(**_training_args(args, work), max_length=args.max_length)
    return SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                      peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))


def held_out_answer_loss(model, eval_file: Path, max_length: int) -> float:
    """Mean loss per answer token on held-out Alpaca examples - the same evaluator for every system."""
    import torch
    from transformers import AutoTokenizer

    from llmtune.models.sources import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").path)
    total, count = 0.0, 0
    for row in json.loads(eval_file.read_text()):
        messages = _alpaca_messages(row)
        prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True)
        prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
        full = tokenizer.apply_chat_template(messages, tokenize=True)
        full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
        full = full[:max_length]
        labels = [-100] * len(prompt) + full[len(prompt):]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([full]), labels=torch.tensor([labels[: len(full)]]))
        answer_tokens = sum(1 for t in labels[1: len(full)] if t != -100)
        total += out.loss.item() * answer_tokens
        count += answer_tokens
    return total / count


if __name__ == "__main__":
    sys.exit(main())
