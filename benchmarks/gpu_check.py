"""GPU check: run short versions of the recipes under every accelerate config that fits one GPU, and record
which ones train, save a loadable model and how long they take. For a machine with a CUDA GPU.

    .venv/bin/python benchmarks/gpu_check.py                # all checks, a few minutes on one GPU
    .venv/bin/python benchmarks/gpu_check.py --only single_sft fsdp_sft

Each check is `accelerate launch --config_file accelerate_configs/<config>.yaml --num_processes 1 -m llmtune train
<recipe> <overrides>` in a fresh process; the outcome (ok / failed / skipped, with the reason) goes to a table
and benchmarks/results/gpu_check.json. DeepSpeed checks are skipped when deepspeed is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"
SST2 = REPO.parent / "shared" / "data" / "sst2"

SFT = ["recipes/smollm2_alpaca_lora.yaml", "data.dataset=null", f"data.train_file={ALPACA}",
       "data.validation_fraction=0.02", "data.max_length=512", "training.max_steps=20", "training.eval_every=10",
       "training.save_every=10", "lm.generation_prompts=[]", "training.precision=bf16"]
FULL_SFT = ["recipes/smollm2_alpaca_full.yaml", *SFT[1:]]
QLORA = ["recipes/smollm2_alpaca_qlora.yaml", *SFT[1:]]
CLASSIFY = ["recipes/sst2_minilm_full.yaml", "data.dataset=null", f"data.train_file={SST2 / 'train.tsv'}",
            f"data.eval_file={SST2 / 'dev.tsv'}", "data.max_train_samples=4000", "training.epochs=1",
            "training.early_stopping_patience=null"]
CHECKS = {  # name -> (accelerate config, recipe + overrides, needs)
    "single_classification": ("single", CLASSIFY, None),
    "single_sft": ("single", SFT, None),
    "single_qlora": ("single", QLORA, "bitsandbytes"),
    "fsdp_full_sft": ("fsdp", FULL_SFT, None),
    "fsdp_lora_sft": ("fsdp", SFT, None),
    "fsdp_qlora": ("fsdp_qlora", QLORA, "bitsandbytes"),
    "zero2_full_sft": ("deepspeed_zero2", FULL_SFT, "deepspeed"),
    "zero3_full_sft": ("deepspeed_zero3", FULL_SFT, "deepspeed"),
    "zero3_lora_sft": ("deepspeed_zero3", SFT, "deepspeed"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), help="Run only these checks.")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check.json"))
    parser.add_argument("--timeout", type=int, default=300, help="Seconds one check may take before it counts as failed.")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("No CUDA GPU here: this script is for a GPU machine (see README, 'Scaling out').", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0)
    results = []
    for name in args.only or CHECKS:
        config, recipe, needs = CHECKS[name]
        print(f"== {name}: {config}", file=sys.stderr, flush=True)
        if needs and importlib.util.find_spec(needs) is None:
            results.append({"check": name, "config": config, "outcome": "skipped", "detail": f"{needs} not installed"})
            continue
        results.append({"check": name, "config": config, **run_check(config, recipe, args.timeout)})
        # Written after every check: a device lease can end mid-way, and what finished must survive.
        table = write_results(Path(args.out), device, results)
        print("\n".join(results[-1].get("log_tail", [])), table.splitlines()[-1], sep="\n", file=sys.stderr, flush=True)
    print(f"GPU: {device}\n\n" + write_results(Path(args.out), device, results))
    return 0 if all(r["outcome"] != "failed" for r in results) else 1


def write_results(out: Path, device: str, results: list[dict]) -> str:
    table = ["| check | accelerate config | outcome | seconds | detail |", "|---|---|---|---|---|"]
    table += [f"| {r['check']} | {r['config']} | {r['outcome']} | {r.get('seconds', '')} | {r.get('detail', '')} |"
              for r in results]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "results": results}, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"GPU: {device}\n\n" + "\n".join(table) + "\n")
    return "\n".join(table)


def run_check(config: str, recipe: list[str], timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        run_dir = Path(work) / "run"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "accelerate_configs" / f"{config}.yaml"), "--num_processes", "1",
                   "-m", "llmtune", "train", *recipe, f"output.dir={run_dir}"]
        start = time.perf_counter()
        # Output to a file, not a pipe: a training process left behind would keep a pipe open and the read waiting.
        with open(Path(work) / "launch.log", "w+") as log:
            launch = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
            timed_out = False
            try:
                launch.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                stop(launch)
            log.seek(0)
            output = log.read()
        seconds = round(time.perf_counter() - start, 1)
        # A failure keeps the log's end, progress bars aside: a timed-out run shows how far it got.
        tail = [line for line in output.splitlines() if line.strip() and "%|" not in line][-25:]
        if timed_out:
            return {"outcome": "failed", "seconds": timeout, "log_tail": tail,
                    "detail": f"timed out after {timeout} s (training process); last: {_last_error(output)}"}
        if launch.returncode != 0:
            return {"outcome": "failed", "seconds": seconds, "detail": _last_error(output), "log_tail": tail}
        saved = sorted(p.name for p in run_dir.glob("*.safetensors"))
        metrics = json.loads((run_dir / "metrics.json").read_text())
        loads = subprocess.run([sys.executable, "-c", LOAD_CHECK, str(run_dir)], capture_output=True, text=True)
        outcome = "ok" if saved and loads.returncode == 0 else "failed"
        after = metrics.get("after", {})
        detail = ", ".join(saved) + (f"; eval loss {after['loss']:.3f}" if "loss" in after else "")
        if loads.returncode != 0:
            detail += f"; reload failed: {_last_error(loads.stderr)}"
        return {"outcome": outcome, "seconds": seconds, "detail": detail}


def stop(launch: subprocess.Popen) -> None:
    """End a launch that ran past its time, and its training processes, which would hold the GPU. torchrun starts
    its workers in sessions of their own and stops them on SIGTERM, so that goes first, to the launch's session;
    SIGKILL only if it is still there after 40 s."""
    os.killpg(launch.pid, signal.SIGTERM)
    try:
        launch.wait(timeout=40)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)
        launch.wait()


LOAD_CHECK = """
import sys
from llmtune.inference.trained import load_trained
model, tokenizer, _ = load_trained(sys.argv[1])
print(model(**tokenizer("Hello there", return_tensors="pt").to(model.device)).logits.shape)
"""


def _last_error(stderr: str) -> str:
    """The last line that names an error (launchers print banners after it), else the last line."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return (errors or lines or ["no output"])[-1][:300].replace("|", "/")


if __name__ == "__main__":
    sys.exit(main())
