"""Quality per step: does llmtune's speed cost accuracy? MiniLM on SST-2, llmtune against a plain PyTorch loop on
the identical sentences and hyperparameters, over several seeds, at each step budget.

Every run trains on the first STEPS x 32 sentences of one fixed shuffle of SST-2's training set (shuffle seed 0,
the same for every run), 1 epoch, batch 32, max length 64, AdamW, linear warmup over 6% of the steps then linear
decay, fp32, and is scored on the whole dev set (872 sentences). Systems:
- `plain`: a hand-written loop - AutoModelForSequenceClassification, peft LoRA for `lora`, random batches, AdamW
  on every trainable weight, no gradient clipping (as transformers' no-Trainer GLUE example);
- `llmtune`: the shipped recipe (sst2_minilm_full / _lora.yaml) with the same settings and its defaults
  (length-grouped batches, clipping at 1.0, no weight decay on biases and norms);
- `llmtune_random`: the same with `training.group_by_length=false` - random batches, to separate the grouping.
The seed sets the head's (and adapters') initial weights, the batch order and dropout; seeds differ between
systems in how they use it, so a comparison is over the spread of seeds, not run by run. Reported: mean +/- std
of dev accuracy and of training seconds, and an exact two-sided permutation test of llmtune vs plain (all
splits of the pooled accuracies).

    .venv/bin/python benchmarks/quality_per_step.py --steps 125 --seeds 5            # ~25 min per method, 2 cores
    .venv/bin/python benchmarks/quality_per_step.py --steps 125 500 --seeds 5 --methods full lora

Writes benchmarks/results/quality_per_step.json and .md (CPU named); runs of other budgets, methods or systems
already in the file are kept, so budgets can be measured one at a time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "sst2"
BATCH, MAX_LENGTH, WARMUP = 32, 64, 0.06
SETTINGS = {"full": {"learning_rate": 5e-5, "weight_decay": 0.01}, "lora": {"learning_rate": 1e-3, "weight_decay": 0.0}}
SYSTEMS = ("plain", "llmtune", "llmtune_random")


def read_tsv(path: Path) -> list[tuple[str, int]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [(text, int(label)) for text, label in (line.rsplit("\t", 1) for line in lines)]


def plain_loop(method: str, sentences: list[tuple[str, int]], dev: list[tuple[str, int]], seed: int) -> dict:
    """The baseline: what a user writes from the transformers and peft docs, nothing more."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    from llmtune.models.sources import resolve_model

    path = resolve_model("minilm").path
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        from llmtune.models.adapters import default_target_modules

        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=default_target_modules("bert")))
    settings = SETTINGS[method]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings["learning_rate"],
                                  weight_decay=settings["weight_decay"])
    steps = len(sentences) // BATCH
    schedule = get_linear_schedule_with_warmup(optimizer, int(WARMUP * steps + 0.999), steps)
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        rows = [sentences[i] for i in order[step * BATCH:(step + 1) * BATCH]]
        batch = tokenizer([t for t, _ in rows], truncation=True, max_length=MAX_LENGTH, padding=True,
                          return_tensors="pt")
        loss = model(**batch, labels=torch.tensor([label for _, label in rows])).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - started
    return {"accuracy": dev_accuracy(model, tokenizer, dev), "train_seconds": seconds}


def dev_accuracy(model, tokenizer, dev: list[tuple[str, int]]) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(dev), 128):
            rows = dev[start:start + 128]
            batch = tokenizer([t for t, _ in rows], truncation=True, max_length=MAX_LENGTH, padding=True,
                              return_tensors="pt")
            predicted = model(**batch).logits.argmax(-1).tolist()
            correct += sum(p == label for p, (_, label) in zip(predicted, rows))
    return correct / len(dev)


def llmtune_run(method: str, train_file: Path, seed: int, grouped: bool, folder: Path) -> dict:
    from llmtune import api, load_recipe

    settings = SETTINGS[method]
    metrics = api.train(load_recipe(str(REPO / "recipes" / f"sst2_minilm_{method}.yaml"), [
        "data.dataset=null", "data.eval_split=null", f"data.train_file={train_file}",
        f"data.eval_file={DATA / 'dev.tsv'}", f"data.max_length={MAX_LENGTH}", "training.epochs=1",
        f"training.batch_size={BATCH}", f"training.learning_rate={settings['learning_rate']}",
        f"training.weight_decay={settings['weight_decay']}", f"training.warmup={WARMUP}", "training.scheduler=linear",
        f"training.seed={seed}", f"training.group_by_length={str(grouped).lower()}", "training.precision=fp32",
        "training.eval_every=no", "training.save_every=no", "training.early_stopping_patience=null",
        "eval.before_training=false", f"output.dir={folder}", "output.report=false"]))
    return {"accuracy": metrics["after"]["accuracy"], "train_seconds": metrics["train"]["train_runtime"]}


def permutation_p(a: list[float], b: list[float]) -> float:
    """Exact two-sided permutation test of the difference in means: the share of all splits of the pooled values
    into groups of len(a) and len(b) whose difference is at least as large as the observed one."""
    pooled, observed = a + b, abs(statistics.mean(a) - statistics.mean(b))
    splits = list(itertools.combinations(range(len(pooled)), len(a)))
    extreme = 0
    for chosen in splits:
        first = [pooled[i] for i in chosen]
        rest = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        extreme += abs(statistics.mean(first) - statistics.mean(rest)) >= observed - 1e-12
    return extreme / len(splits)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[125], help="step budgets (x 32 sentences each)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", nargs="+", choices=list(SETTINGS), default=["full"])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality_per_step.json"))
    args = parser.parse_args()

    from speed import machine, rewrite_results_md

    from llmtune.run.files import write_json, write_text
    from llmtune.run.run_dir import library_versions

    train, dev = read_tsv(DATA / "train.tsv"), read_tsv(DATA / "dev.tsv")
    random.Random(0).shuffle(train)
    out = Path(args.out)
    earlier = json.loads(out.read_text()) if out.is_file() else {}
    planned = set(itertools.product(args.methods, args.steps, args.systems))
    kept = [r | {"cpu": r.get("cpu", earlier.get("cpu"))} for r in earlier.get("runs", [])
            if (r["method"], r["steps"], r["system"]) not in planned]
    runs = []
    for method, steps in itertools.product(args.methods, args.steps):
        sentences = train[:steps * BATCH]
        with tempfile.TemporaryDirectory() as folder:
            train_file = Path(folder) / "train.tsv"
            train_file.write_text("sentence\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in sentences))
            for seed in range(args.seeds):  # systems interleaved, so a slow spell of the machine hits all alike
                for system in args.systems:
                    if system == "plain":
                        result = plain_loop(method, sentences, dev, seed)
                    else:
                        result = llmtune_run(method, train_file, seed, system == "llmtune",
                                             Path(folder) / f"{system}-{seed}")
                    runs.append({"method": method, "steps": steps, "system": system, "seed": seed, **result})
                    print(f"{method} {steps} steps, {system}, seed {seed}: accuracy {result['accuracy']:.4f}, "
                          f"{result['train_seconds']:.1f} s", flush=True)
    runs = kept + [r | {"cpu": machine()} for r in runs]  # budgets run at different times keep their own CPU
    summary = summarize(runs)
    table = render(summary)
    print(table)
    commands = [c for c in earlier.get("commands", [earlier.get("command")]) if c and kept]
    commands.append(" ".join([Path(sys.executable).name, *sys.argv]))
    write_json(out, {"cpu": machine(), "threads": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())),
                     "commands": commands, "runs": runs, "summary": summary, "versions": library_versions()})
    machines = sorted({r["cpu"] for r in runs})
    write_text(out.with_suffix(".md"), f"`benchmarks/quality_per_step.py` ({'; '.join(commands)}), "
               f"{', '.join(machines)}: MiniLM on SST-2, the same sentences and hyperparameters for every system, "
               "scored on the 872 dev sentences.\n\n" + table + "\n")
    rewrite_results_md()  # RESULTS.md shows this table
    return 0


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for method, steps in sorted({(r["method"], r["steps"]) for r in runs}):
        mine = [r for r in runs if r["method"] == method and r["steps"] == steps]
        plain = [r["accuracy"] for r in mine if r["system"] == "plain"]
        for system in [s for s in SYSTEMS if any(r["system"] == s for r in mine)]:
            accuracy = [r["accuracy"] for r in mine if r["system"] == system]
            seconds = [r["train_seconds"] for r in mine if r["system"] == system]
            rows.append({"method": method, "steps": steps, "system": system, "seeds": len(accuracy),
                         "accuracy_mean": statistics.mean(accuracy), "accuracy_std": _std(accuracy),
                         "seconds_mean": statistics.mean(seconds), "seconds_std": _std(seconds),
                         "p_vs_plain": permutation_p(accuracy, plain) if system != "plain" and plain else None})
    return rows


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def render(summary: list[dict]) -> str:
    lines = ["| method | steps | system | seeds | dev accuracy, mean +/- std | train seconds | p vs plain (exact) |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        p = "-" if r["p_vs_plain"] is None else f"{r['p_vs_plain']:.3f}"
        lines.append(f"| {r['method']} | {r['steps']} | {r['system']} | {r['seeds']} | {r['accuracy_mean']:.4f} +/- "
                     f"{r['accuracy_std']:.4f} | {r['seconds_mean']:.1f} +/- {r['seconds_std']:.1f} | {p} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
