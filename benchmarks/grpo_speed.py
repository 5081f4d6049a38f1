"""GRPO speed: llmtune against trl's documented GRPO script on the same model, prompts, rewards and settings.

Both systems train SmolLM2-135M-Instruct with a LoRA adapter (r 16, alpha 32, all linear layers) on the same
Alpaca instructions with 1-2 sampled constraints (written once to a file both read), rewarded by the same
functions (llmtune's constraints checks + 0.5 x soft overlong penalty), 4 completions per prompt, 64 new tokens,
8 completions per device x 2 accumulation, loss dapo, beta 0, temperature 1, the same learning rate and seed. The
trl script is the one its docs teach: a model, a LoraConfig and GRPOConfig's defaults otherwise (bf16 autocast and
activation checkpointing), on its plain `generate` path (no vLLM on a CPU); "trl_tuned" is that script with
fp32 and no checkpointing, as an informed user would set it on this CPU. Each system runs in a fresh process; the
first step (warm-up) is not timed.

    .venv/bin/python benchmarks/grpo_speed.py --steps 8       # prints a table, writes benchmarks/results/grpo_speed.json

Reported: sampled completions per second, seconds per step, peak resident memory, the mean training reward of
the timed steps, and the machine.
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

from worker import peak_rss_mb, reset_peak_rss, run_in_fresh_process  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"
SYSTEMS = ("trl_script", "trl_tuned", "llmtune")
SETTINGS = {"num_generations": 4, "max_completion_length": 64, "batch_size": 8, "accumulation": 2,
            "learning_rate": 1e-4, "prompts": 400}


def write_prompts(path: Path) -> None:
    from llmtune.rewards.constraints import constrained_prompts

    rows = json.loads(ALPACA.read_text())
    instructions = [r["instruction"] for r in rows if not r["input"]][:SETTINGS["prompts"]]
    path.write_text("".join(json.dumps(row) + "\n" for row in constrained_prompts(instructions, seed=0)))


def llmtune_trainer(prompts: Path, work: Path, steps: int):
    from llmtune import api, load_recipe

    recipe = load_recipe(REPO / "recipes" / "smollm2_grpo_constraints.yaml", [
        f"data.train_file={prompts}", "data.holdout_every=null", "rl.add_constraints=0",
        f"training.max_steps={steps}", f"training.learning_rate={SETTINGS['learning_rate']}",
        f"training.batch_size={SETTINGS['batch_size']}", f"training.gradient_accumulation={SETTINGS['accumulation']}",
        "training.eval_every=no", "training.save_every=no", "training.warmup=0", "training.scheduler=constant",
        "training.log_every=1",
        f"output.dir={work / 'run'}", "output.report=false"])
    return api.build_trainer(recipe)


def trl_script_trainer(prompts: Path, work: Path, steps: int, tuned: bool = False):
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from llmtune.models.sources import resolve_model
    from llmtune.rewards.builtin import constraints, soft_overlong

    def constraint_reward(completions, **kwargs):  # reads the dataset's `constraints` column, as in llmtune
        return constraints(completions, **kwargs)

    def overlong_reward(completions, completion_ids, **kwargs):
        return soft_overlong(completions, completion_ids=completion_ids,
                             max_length=SETTINGS["max_completion_length"])

    dataset = load_dataset("json", data_files=str(prompts), split="train")
    dataset = dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    args = GRPOConfig(
        output_dir=str(work / "trl"), max_steps=steps, learning_rate=SETTINGS["learning_rate"],
        per_device_train_batch_size=SETTINGS["batch_size"], gradient_accumulation_steps=SETTINGS["accumulation"],
        num_generations=SETTINGS["num_generations"], max_completion_length=SETTINGS["max_completion_length"],
        loss_type="dapo", beta=0.0, temperature=1.0, reward_weights=[1.0, 0.5], logging_steps=1,
        report_to="none", save_strategy="no", lr_scheduler_type="constant", seed=42, use_cpu=True,
        **({"bf16": False, "gradient_checkpointing": False} if tuned else {}))
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    return GRPOTrainer(model=resolve_model("smollm2-135m-instruct").path, reward_funcs=[constraint_reward,
                       overlong_reward], args=args, train_dataset=dataset, peft_config=lora)


def worker(system: str, prompts: Path, steps: int) -> dict:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.rewards: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                self.rewards.append(logs["reward"])

    with tempfile.TemporaryDirectory() as folder:
        if system == "llmtune":
            trainer = llmtune_trainer(prompts, Path(folder), steps)
        else:
            trainer = trl_script_trainer(prompts, Path(folder), steps, tuned=system == "trl_tuned")
        clock = Clock()
        trainer.add_callback(clock)
        reset_peak_rss()
        trainer.train()
    timed = clock.ends[-1] - clock.ends[0]
    per_step = SETTINGS["batch_size"] * SETTINGS["accumulation"]
    return {"system": system, "completions_per_s": per_step * (len(clock.ends) - 1) / timed,
            "seconds_per_step": timed / (len(clock.ends) - 1), "peak_rss_mb": peak_rss_mb(),
            "mean_reward_timed_steps": sum(clock.rewards[1:]) / max(len(clock.rewards) - 1, 1),
            "precision": "bf16" if trainer.args.bf16 else "fp32",
            "activation_checkpointing": bool(trainer.args.gradient_checkpointing)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worker", choices=SYSTEMS)
    parser.add_argument("--prompts")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "grpo_speed.json"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.prompts), args.steps)))
        return 0

    from llmtune.run.files import write_json
    from llmtune.run.run_dir import _cpu_name

    with tempfile.TemporaryDirectory() as folder:
        prompts = Path(folder) / "prompts.jsonl"
        write_prompts(prompts)
        results = []
        for system in reversed(SYSTEMS):  # llmtune first
            print(f"{system}: {args.steps} steps ...", file=sys.stderr, flush=True)
            result = run_in_fresh_process([__file__, "--worker", system, "--prompts", str(prompts),
                                           "--steps", str(args.steps)])
            if result:
                results.append(result)
    print(f"{'system':<12} {'completions/s':>14} {'s/step':>8} {'peak RSS MB':>12} {'reward':>7} precision, checkpointing")
    for r in results:
        print(f"{r['system']:<12} {r['completions_per_s']:14.2f} {r['seconds_per_step']:8.1f} {r['peak_rss_mb']:12.0f} "
              f"{r['mean_reward_timed_steps']:7.3f} {r['precision']}, {r['activation_checkpointing']}")
    by = {r["system"]: r for r in results}
    for other in ("trl_script", "trl_tuned"):
        if other in by and "llmtune" in by:
            print(f"llmtune / {other}: {by['llmtune']['completions_per_s'] / by[other]['completions_per_s']:.2f}x")
    report = {"settings": {**SETTINGS, "steps": args.steps}, "results": results, "cpu": _cpu_name(),
              "threads": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())), "date": time.strftime("%Y-%m-%d")}
    write_json(Path(args.out), report)  # the project's writer: folders made, a crash leaves the old file
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
