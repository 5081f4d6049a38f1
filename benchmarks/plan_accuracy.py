"""How honest `llmtune plan` is: its predicted peak memory and duration against a real run of the same recipe.

For each case, `llmtune plan RECIPE ... --json` runs in a fresh process, then the same recipe trains in another
fresh process. Peak memory is the process's peak resident set (ru_maxrss: loading, training and evaluation, as the
plan measures it); time is the Trainer's train_runtime (evaluations during training included) plus the final
evaluation. Targets: peak within +/-25%, time within +/-30%. Run it on an otherwise idle machine: two CPU-heavy
processes on 2 cores slow each other down unevenly (the timings then say nothing).

    .venv/bin/python benchmarks/plan_accuracy.py                  # 4 cases, ~10 minutes on 2 CPU cores
    .venv/bin/python benchmarks/plan_accuracy.py --cases minilm_full
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SST2 = ["data.dataset=null", f"data.train_file={DATA / 'sst2' / 'train.tsv'}", f"data.eval_file={DATA / 'sst2' / 'dev.tsv'}",
        "data.eval_split=null", "data.max_train_samples=512", "data.max_eval_samples=128", "training.epochs=1",
        "training.eval_every=no", "training.save_every=no", "training.early_stopping_patience=null"]
ALPACA = ["data.dataset=null", f"data.train_file={DATA / 'alpaca' / 'alpaca_5000.json'}", "data.validation_fraction=0.2",
          "data.max_train_samples=64", "data.max_eval_samples=16", "data.max_length=256", "training.epochs=1",
          "training.gradient_accumulation=1", "training.eval_every=no", "training.save_every=no",
          "lm.generation_prompts=[]"]
CASES = {
    "minilm_full": ("sst2_minilm_full.yaml", SST2),
    "minilm_lora": ("sst2_minilm_lora.yaml", SST2),
    "smollm2_lora": ("smollm2_alpaca_lora.yaml", ALPACA),
    "smollm2_qlora": ("smollm2_alpaca_qlora.yaml", ALPACA),
}
TRAIN = """
import json, resource, sys
from llmtune import load_recipe, train
metrics = train(load_recipe(sys.argv[1], sys.argv[2:]))
seconds = metrics["train"]["train_runtime"] + metrics.get("after", {}).get("runtime", 0.0)
print(json.dumps({"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": seconds}))
"""


def measure(case: str, work: Path) -> dict:
    recipe, overrides = CASES[case]
    recipe_path = str(REPO / "recipes" / recipe)
    plan = _last_json(subprocess.run([sys.executable, "-m", "llmtune", "plan", recipe_path, *overrides, "--json"],
                                     capture_output=True, text=True))
    real = _last_json(subprocess.run([sys.executable, "-c", TRAIN, recipe_path, *overrides,
                                      f"output.dir={work / case}"], capture_output=True, text=True))
    return {"case": case, "predicted_peak_bytes": plan["predicted_peak_bytes"], "measured_peak_bytes": real["peak_bytes"],
            "predicted_seconds": plan["time_seconds"], "measured_seconds": real["seconds"],
            "peak_error": plan["predicted_peak_bytes"] / real["peak_bytes"] - 1,
            "time_error": plan["time_seconds"] / real["seconds"] - 1, "plan": plan}


def _last_json(done: subprocess.CompletedProcess) -> dict:
    if done.returncode != 0:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-4000:])
    text = done.stdout
    return json.loads(text[text.index("{"):]) if text.lstrip().startswith("{") else json.loads(text.splitlines()[-1])


def main() -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "plan_accuracy.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for case in args.cases:
            print(f"{case} ...", file=sys.stderr, flush=True)
            rows.append(measure(case, Path(work)))
            print(f"  peak {rows[-1]['peak_error']:+.0%}, time {rows[-1]['time_error']:+.0%}", file=sys.stderr, flush=True)
    lines = [f"{'case':14s} {'peak predicted':>14s} {'peak measured':>13s} {'error':>7s} {'time predicted':>14s} "
             f"{'time measured':>13s} {'error':>7s}"]
    for r in rows:
        gib = (r["predicted_peak_bytes"] / 2**30, r["measured_peak_bytes"] / 2**30)
        lines.append(f"{r['case']:14s} {gib[0]:11.2f} GiB {gib[1]:10.2f} GiB "
                     f"{r['peak_error']:+7.0%} {r['predicted_seconds']:12.0f} s {r['measured_seconds']:11.0f} s "
                     f"{r['time_error']:+7.0%}")
    print("\n".join(lines))
    from llmtune.run.run_dir import library_versions

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "plan_accuracy", "command": " ".join(sys.argv),
                               "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
                               "versions": library_versions(), "cases": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
