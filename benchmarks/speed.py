"""Speed benchmark: llmtune's defaults against the strongest baselines, on the same model, data, adapter
settings, learning rate, batch size and machine, in one run.

Workloads (benchmarks/speed_workloads.py): SmolLM2-135M-Instruct LoRA SFT on Alpaca (plain Trainer script, TRL
with its defaults, TRL tuned for speed, llmtune), QLoRA on SmolLM2 (plain Trainer, llmtune), all-MiniLM-L6-v2
LoRA on SST-2 (plain Trainer, llmtune), a tiny GPT pretrained from scratch on Tiny Shakespeare (plain
Trainer, llmtune), SmolLM2 LoRA DPO on Anthropic HH pairs (trl's documented DPO script, llmtune) and, on a GPU
only (`--size gpu`), a 1.2B Llama built from a config with random weights, LoRA SFT on Alpaca. Every
system trains in a fresh process until it has processed the same number of effective tokens (tokens attended
to; padding excluded). The budget is the workload's, raised where a first-round run times under 60 s or 20
optimizer steps (the rounds then start again); a system with any round still that short is flagged. The compared systems
run 3 interleaved rounds and report the median and the spread. Then one shared evaluator per workload scores
every model on the same held-out data.

Reported per run: effective tokens/s, step time, padding share, peak RSS (and peak GPU memory on CUDA),
held-out loss, and MFU = model FLOPs per token (benchmarks/flops.py: what the method computes - frozen weights
without weight gradients, the head at loss positions, each document's causal attention) x tokens/s / the matmul
peak of the run's precision, measured around each workload (best of torch.matmul and F.linear on square fp32
and bf16 matrices). Where bf16 is native (CUDA,
avx512_bf16/AMX) llmtune also runs once in bf16, for an MFU in both precisions (`--bf16-run on` forces it).
Preprocessing: every SFT system's path from the whole Alpaca 5k file to tokens, cold and with its cache warm.

    .venv/bin/python benchmarks/speed.py                         # about 2.5 hours on 2 CPU cores
    .venv/bin/python benchmarks/speed.py --workloads sft_lora    # one workload; the others keep their results
    .venv/bin/python benchmarks/speed.py --workloads sft_lora --size gpu
    .venv/bin/python benchmarks/speed.py --recount-flops        # MFUs of the stored runs recounted, nothing timed
Writes benchmarks/results/speed.json and benchmarks/RESULTS.md (with --size gpu: results/speed_gpu.json and RESULTS_GPU.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from speed_run import count_flops, run_system, sync  # noqa: E402
from speed_workloads import ALPACA_5K, REPO, WORKLOADS, _cuda, prepare, sft_preprocessing_seconds  # noqa: E402
from worker import run_in_fresh_process  # noqa: E402

REFERENCE_BUDGET_SHARE = 0.05  # of the workload's budget, for the runs measured once (TRL defaults, llmtune in bf16)
LONG_ENOUGH = (60.0, 20)  # seconds, timed steps: a first-round run shorter raises the budget; any shorter round is flagged
MAX_RESTARTS = 3  # budget raises per workload; a machine whose speed swings more than that gets flagged runs
ONCE = ("trl",)  # far too slow on a CPU to repeat; a reference, not a comparison target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS),
                        help="Measure these (default: every workload with a budget for --size); the others keep their "
                        "last results in the report (--out, --results-md).")
    parser.add_argument("--size", choices=["cpu", "gpu"], default="gpu" if _cuda() else "cpu")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="Multiply every token budget (one too short for this machine is raised, unless --min-seconds 0).")
    parser.add_argument("--min-seconds", type=float, default=LONG_ENOUGH[0],
                        help="Raise the budget until every first-round run times this long (and 20 steps); 0: never, "
                        "for a quick look on a short lease. Rounds under 60 s or 20 steps are flagged short either way.")
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--with-compile", action="store_true", help="Also run llmtune with training.compile=true.")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Interleaved rounds of every compared system; the median is reported, with the spread.")
    parser.add_argument("--bf16-run", choices=["auto", "on", "off"], default="auto",
                        help="The llmtune bf16 reference run; auto: only where bf16 is native (CUDA, avx512_bf16/AMX), "
                        "since emulated bf16 is several times slower than fp32 and only gives an MFU.")
    parser.add_argument("--skip-preprocessing", action="store_true", help="Keep the last preprocessing numbers.")
    parser.add_argument("--recount-flops", action="store_true",
                        help="Measure nothing: count each stored run's FLOPs per token (benchmarks/flops.py) from its "
                             "system's own batches, recompute the MFUs and rewrite the JSON and the results file.")
    parser.add_argument("--out", help="default benchmarks/results/speed.json (speed_gpu.json with --size gpu)")
    parser.add_argument("--results-md", help="default benchmarks/RESULTS.md (RESULTS_GPU.md with --size gpu)")
    for hidden in ("worker", "work", "system", "precision", "token-budget", "batch-size", "seed"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    parser.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "prep":
        args.batch_size = 1
        seconds = sft_preprocessing_seconds(args.system, args, Path(args.work), ALPACA_5K)
        print(json.dumps({"seconds": round(seconds, 3)}))
        return 0
    if args.worker:
        print(json.dumps(count_flops(args) if args.count_flops else run_system(args)))
        return 0
    sized = [name for name, workload in WORKLOADS.items() if args.size in workload.token_budget]
    unsized = sorted(set(args.workloads or ()) - set(sized))
    if unsized:
        parser.error(f"--workloads {' '.join(unsized)}: no {args.size} budget; with --size {args.size} pick from "
                     f"{', '.join(sized)}")
    args.workloads = args.workloads or sized
    suffix = "_gpu" if args.size == "gpu" else ""  # GPU numbers beside the CPU ones, not in place of them
    args.out = args.out or str(REPO / "benchmarks" / "results" / f"speed{suffix}.json")
    args.results_md = args.results_md or str(REPO / "benchmarks" / f"RESULTS{suffix.upper()}.md")

    from llmtune.run.files import write_json, write_text
    from llmtune.run.run_dir import library_versions

    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    if args.recount_flops:
        recount_flops(previous, args)
        write_json(Path(args.out), previous)
        write_text(Path(args.results_md), render(previous, Path(args.results_md).resolve() == RESULTS_MD))
        print(f"Wrote {args.out} and {args.results_md}")
        return 0
    kept = {name: block for name, block in previous.get("workloads", {}).items() if "date" in block}  # this format
    report = {"size": args.size, "repeats": args.repeats, "workloads": kept}
    if "date" in previous.get("preprocessing_alpaca5k_s", {}):
        report["preprocessing_alpaca5k_s"] = previous["preprocessing_alpaca5k_s"]
    stamp = {"date": time.strftime("%Y-%m-%d"), "machine": machine()}
    with tempfile.TemporaryDirectory() as work:
        if not args.skip_preprocessing:
            report["preprocessing_alpaca5k_s"] = {**preprocessing(Path(work)), **stamp}
        for name in args.workloads:
            workload = WORKLOADS[name]
            folder = Path(work) / name
            folder.mkdir()
            prepare(name, folder, args.train_samples)
            budget = int(workload.token_budget[args.size] * args.budget_scale)
            # The shared machine's speed drifts; the peak is the best seen either side of the workload's runs.
            peak = matmul_peak()
            results, budget = measure(name, folder, budget, args, peak)
            end_peak = matmul_peak()
            peak = {key: max(peak[key], end_peak[key]) for key in peak}
            summarize(results, peak, workload.systems[0])
            report["workloads"][name] = {"title": workload.title, "token_budget": budget, "results": results,
                                         "matmul_peak_gflops": peak, "repeats": args.repeats, **stamp}
            print(render_workload(name, report["workloads"][name]), flush=True)
    report["versions"] = library_versions()
    write_json(Path(args.out), report)
    write_text(Path(args.results_md), render(report, Path(args.results_md).resolve() == RESULTS_MD))
    print(f"Wrote {args.out} and {args.results_md}")
    return 0


def measure(name: str, folder: Path, budget: int, args: argparse.Namespace,
            peak: dict[str, float]) -> tuple[list[dict], int]:
    """Every system on one workload, each run in a fresh process, and the token budget they ran with. The compared
    systems run `repeats` interleaved rounds (so a slow spell of the shared machine hits all of them alike) and
    report the median round with the spread; round r seeds every system with 42 + r, so their held-out losses are
    over seeds (mean +/- std in the table); TRL's defaults and the bf16 run are references, run once on a short
    budget. A first-round run shorter than `--min-seconds` or LONG_ENOUGH's steps raises the budget
    (`longer_budget`) and the rounds start again, so every system still sees the same tokens; llmtune, usually the
    fastest, runs first."""
    workload = WORKLOADS[name]
    # Every compared system trains in the precision that is fastest on the machine (fp32 where bf16 is emulated,
    # bf16 on a GPU): a plain script's author would pick it too. TRL's defaults keep their own.
    compared = [(system, "auto" if system != "trl" else "default")
                for system in workload.systems if system not in ONCE]
    if args.with_compile:
        compared.append(("llmtune", "compile"))
    compared.sort(key=lambda run: run[0] != "llmtune")  # stable: llmtune, its compiled run, then the rest
    once = [(system, "default") for system in workload.systems if system in ONCE]
    if args.bf16_run == "on" or (args.bf16_run == "auto" and _native_bf16()):
        once.append(("llmtune", "bf16"))
    order = [(*run, 42) for run in compared + once] + [
        (*run, 42 + r) for r in range(1, args.repeats) for run in compared]  # (system, precision, seed)
    rounds: dict[str, list[dict]] = {}
    done = restarts = 0
    while done < len(order):
        system, precision, seed = order[done]
        short = (system, precision) in once
        tokens = int(budget * REFERENCE_BUDGET_SHARE) if short else budget
        print(f"{name}: {system} ({precision}), {tokens} tokens ...", file=sys.stderr, flush=True)
        result = run_in_fresh_process([
            __file__, "--worker", name, "--work", str(folder), "--system", system, "--precision", precision,
            "--token-budget", str(tokens), "--batch-size", str(workload.batch_size[args.size]),
            "--seed", str(seed)])
        done += 1
        if result is None:
            continue
        # Each run's numbers go to the log as they come: a GPU lease can end before the report is written.
        gpu = f", GPU {result['peak_gpu_mb']:.0f} MB" if result.get("peak_gpu_mb") else ""
        utilization = mfu(result, peak)
        mfu_text = f", MFU {utilization:.2%} of the matmul peak measured before the runs" if utilization else ""
        print(f"{name}: {system} ({precision}): {result['tokens_per_s']:.1f} tok/s, {result['steps'] - 1} timed steps "
              f"in {result['timed_seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB{gpu}{mfu_text}",
              file=sys.stderr, flush=True)
        raised = longer_budget(budget, result, args.min_seconds) if done <= len(compared) else budget
        if raised > budget and result["effective_tokens"] < budget:  # training ran out of data, not of budget
            print(f"{name}: {system} used all its data in {result['timed_seconds']:.0f} s; a larger budget would "
                  "not make it longer (raise --train-samples)", file=sys.stderr, flush=True)
        elif raised > budget and restarts < MAX_RESTARTS:
            print(f"{name}: {system} timed {result['timed_seconds']:.0f} s, {result['steps'] - 1} steps: budget "
                  f"raised to {raised} tokens; the rounds start again", file=sys.stderr, flush=True)
            budget, rounds, done, restarts = raised, {}, 0, restarts + 1
            continue
        label = {"bf16": "llmtune (bf16)", "compile": "llmtune (torch.compile)"}.get(precision, system)
        rounds.setdefault(label, []).append({**result, "reference_only": short, "seed": seed})
    order_of_rows = [*workload.systems, "llmtune (bf16)", "llmtune (torch.compile)"]
    return [median_round(label, rounds[label]) for label in order_of_rows if label in rounds], budget


def longer_budget(budget: int, result: dict, seconds: float) -> int:
    """The budget unchanged if the run timed at least `seconds` (0: any time) and LONG_ENOUGH's steps, else one
    that makes it 15% longer than that at the speed it ran. Scaled from the tokens the run took, which a run held
    to MIN_TIMED_STEPS can take beyond its budget; the first step, untimed, counts towards them but not the time."""
    if not seconds:
        return budget
    stretch = max(seconds / result["timed_seconds"], LONG_ENOUGH[1] / max(result["steps"] - 1, 1))
    return budget if stretch <= 1 else math.ceil(max(budget, result["effective_tokens"]) * stretch * 1.15)


def median_round(label: str, runs: list[dict]) -> dict:
    """The round with the median tokens/s (the lower middle of an even count), with every round's speed, the
    spread (max - min) / median, and the shortest round's time and steps (what `render_workload` flags)."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    middle = ordered[(len(ordered) - 1) // 2]
    speeds = [round(r["tokens_per_s"], 1) for r in runs]
    losses = [r["held_out_loss"] for r in runs]
    return {"system": label, **middle, "tokens_per_s_rounds": speeds, "held_out_loss_rounds": losses,
            "seeds": [r.get("seed", 42) for r in runs],
            "spread": (max(speeds) - min(speeds)) / middle["tokens_per_s"],
            "shortest_round": {"timed_seconds": min(r["timed_seconds"] for r in runs),
                               "steps": min(r["steps"] for r in runs)}}


def preprocessing(work: Path) -> dict[str, dict[str, float | None]]:
    """Each system's path from the Alpaca 5k file to tokens: first with an empty datasets cache (cold), then
    again in a new process with the cache the first run left (cached, the median of three). One cache per
    system; the tokenizer is loaded before the clock starts for every system."""
    times = {}
    for system in ("plain_trainer", "trl", "llmtune"):
        env = {**os.environ, "HF_DATASETS_CACHE": str(work / f"datasets-cache-{system}"),
               "LLMTUNE_CACHE": str(work / f"llmtune-cache-{system}")}
        command = [__file__, "--worker", "prep", "--system", system, "--work", str(work)]
        cold = run_in_fresh_process(command, env=env)
        cached = sorted((run_in_fresh_process(command, env=env) or {}).get("seconds") or float("inf")
                        for _ in range(3))[1]
        times[system] = {"cold": (cold or {}).get("seconds"), "cached": cached if cached != float("inf") else None}
        print(f"preprocessing Alpaca 5k, {system}: {times[system]}", file=sys.stderr, flush=True)
    return times


def recount_flops(report: dict, args: argparse.Namespace) -> None:
    """FLOPs per token for every stored run (one count per workload and system, from that system's own batches) and
    the MFUs recomputed from them; the measured speeds are left as they are."""
    with tempfile.TemporaryDirectory() as work:
        for name, block in report.get("workloads", {}).items():
            folder = Path(work) / name
            folder.mkdir()
            prepare(name, folder, args.train_samples)
            counted: dict[str, float | None] = {}
            for result in block["results"]:
                system = result["system"]
                if system not in counted:  # "llmtune (bf16)" is llmtune's worker in another precision
                    counted[system] = (run_in_fresh_process([
                        __file__, "--worker", name, "--work", str(folder), "--system", system.split(" (")[0],
                        "--precision", "fp32",
                        "--token-budget", "0", "--batch-size", str(WORKLOADS[name].batch_size[report["size"]]),
                        "--count-flops"]) or {}).get("flops_per_token")
                    print(f"{name}: {system}: {counted[system]} FLOPs per token", file=sys.stderr, flush=True)
                result["flops_per_token"] = counted[system]
                result["mfu"] = mfu(result, block["matmul_peak_gflops"])


def summarize(results: list[dict], peak: dict[str, float], baseline_system: str) -> None:
    """MFU against the peak of each run's precision; speed ratios against the workload's baseline (its first
    system: the plain Trainer script, or trl's script for DPO) and against TRL tuned where it ran."""
    baseline = next((r for r in results if r["system"] == baseline_system), None)
    tuned = next((r for r in results if r["system"] == "trl_tuned"), None)
    for r in results:
        r["mfu"] = mfu(r, peak)
        r["speed_vs_baseline"] = r["tokens_per_s"] / baseline["tokens_per_s"] if baseline else None
        r["speed_vs_trl_tuned"] = r["tokens_per_s"] / tuned["tokens_per_s"] if tuned else None


# --- reporting ---------------------------------------------------------------------------------------------


def mfu(result: dict, peak: dict[str, float]) -> float | None:
    """Model FLOPs per second (benchmarks/flops.py: what the method must compute per token, times tokens/s) over
    the matmul peak of the run's precision; None where either was not measured."""
    if result["precision"] not in peak or not result.get("flops_per_token"):
        return None
    return result["flops_per_token"] * result["tokens_per_s"] / (peak[result["precision"]] * 1e9)


def render_workload(name: str, block: dict) -> str:
    peak, baseline = block["matmul_peak_gflops"], WORKLOADS[name].systems[0]
    tuned = any(r["system"] == "trl_tuned" for r in block["results"])
    lines = [f"### {block['title']}", "",
             f"`{name}`: {block['token_budget']:,} effective training tokens per run (references: "
             f"{int(block['token_budget'] * REFERENCE_BUDGET_SHARE):,}); measured {block['date']} on "
             f"{block['machine']}; matmul peak fp32 {peak['fp32']:.1f}, bf16 {peak['bf16']:.1f} GFLOP/s.", "",
             f"| system | effective tokens/s (median) | spread | vs {baseline} |" + (" vs TRL tuned |" if tuned else "")
             + " s/step | timed | padding | peak RSS (MB) | held-out loss | MFU | precision | activation ckpt | "
             "tokens/s of each round |",
             "|---|---|---|---|" + ("---|" if tuned else "") + "---|---|---|---|---|---|---|---|---|"]
    for r in block["results"]:
        loss = _held_out(r)
        memory = f"{r['peak_rss_mb']:.0f}" + (f" / GPU {r['peak_gpu_mb']:.0f}" if r.get("peak_gpu_mb") else "")
        timed = f"{r['timed_seconds']:.0f} s, {r['steps'] - 1} steps"
        if r.get("reference_only"):
            timed += " (reference, once)"
        elif _short(r.get("shortest_round", r)):  # results written before rounds were checked: the median only
            timed += " (short)"
        ratios = (f"{r['speed_vs_baseline']:.2f}x |" if r["speed_vs_baseline"] else "- |") + (
            f" {r['speed_vs_trl_tuned']:.2f}x |" if tuned else "")
        utilization = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        lines.append(f"| {r['system']} | {r['tokens_per_s']:.1f} | {r['spread']:.0%} | {ratios} "
                     f"{r['seconds_per_step']:.2f} | {timed} | {r['padding_share']:.0%} | {memory} | {loss} | "
                     f"{utilization} | {r['precision']} | {'on' if r['activation_checkpointing'] else 'off'} | "
                     f"{', '.join(f'{x:.1f}' for x in r['tokens_per_s_rounds'])} |")
    return "\n".join(lines)


def _held_out(result: dict) -> str:
    """The median round's held-out loss or, where the rounds ran with different seeds, their mean +/- std."""
    losses = result.get("held_out_loss_rounds", [])
    if len(set(result.get("seeds", []))) > 1:
        text = f"{statistics.mean(losses):.4f} +/- {statistics.stdev(losses):.4f} ({len(losses)} seeds)"
    else:
        text = f"{result['held_out_loss']:.4f}"
    return text + (f" (acc {result['held_out_accuracy']:.3f})" if "held_out_accuracy" in result else "")


def _short(run: dict) -> bool:
    return run["timed_seconds"] < LONG_ENOUGH[0] or run["steps"] - 1 < LONG_ENOUGH[1]


def render(report: dict, companions: bool = False) -> str:
    """The results file; `companions`: with the tables other benchmarks write (RESULTS.md only)."""
    prep = report.get("preprocessing_alpaca5k_s", {})
    gpu = report["size"] == "gpu"
    lines = ["# Speed benchmark results" + (" on a GPU" if gpu else ""), "",
             f"Reproduce: `python benchmarks/speed.py{' --size gpu' if gpu else ''}` (every workload; `--workloads "
             "NAME ...` re-measures some and keeps the rest; writes this file and "
             f"`benchmarks/results/speed{'_gpu' if gpu else ''}.json`).", "",
             f"Every compared system runs {report['repeats']} interleaved rounds, each in a fresh process, and the "
             "median round is reported with the spread of the rounds, (max - min) / median. A first-round run that timed "
             f"under `--min-seconds` ({LONG_ENOUGH[0]:.0f} s by default; 0 turns this off) or {LONG_ENOUGH[1]} "
             "optimizer steps raises the workload's token budget and the rounds start again; a system with any round "
             f"under {LONG_ENOUGH[0]:.0f} s or {LONG_ENOUGH[1]} steps is flagged short. TRL's defaults and "
             "the bf16 run (by default only where bf16 is native) are references, run once on a short budget. "
             "Effective tokens are tokens the model attends to (padding excluded). Held-out loss is computed by one "
             "evaluator per workload, the same for every system, after the same number of effective tokens. "
             "MFU = model FLOPs per token x tokens/s / matmul peak of the run's precision. The FLOPs are what the "
             "method must compute (benchmarks/flops.py, checked against torch's FLOP counter in tests/test_flops.py): "
             "6 per trained weight and 4 per frozen one (forward and input gradient, no weight gradient), the output "
             "head only at positions that carry a loss, attention over each document's own causal pairs; "
             "DPO adds the reference pass (a forward of the adapter-off model); activation recomputation and "
             "padding are the system's overhead and not counted.", ""]
    for name, block in report["workloads"].items():
        lines += [render_workload(name, block), ""]
    if prep:  # absent when a run skipped it and no earlier numbers exist
        lines += [f"Preprocessing of all 5,000 Alpaca examples (load the file, chat template, tokenize; llmtune also "
                  f"builds loss masks; TRL's time includes its LoRA wrapping), measured {prep.get('date', '-')} on "
                  f"{prep.get('machine', '-')}. Each system loads its tokenizer before the clock starts, then runs in a "
                  "fresh process with an empty datasets cache (cold) and again, three times, with the cache the first "
                  "run left (cached, the median):", "",
                  "| system | cold (s) | cached (s) |", "|---|---|---|"]
        for system, seconds in prep.items():
            if isinstance(seconds, dict):
                lines.append(f"| {system} | {_seconds(seconds['cold'])} | {_seconds(seconds['cached'])} |")
        lines.append("")
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines += [f"Versions (the latest run): {versions}.", ""]
    if not gpu:
        lines += ["On a GPU: `--size gpu` writes `benchmarks/RESULTS_GPU.md`; the short looks that fit a device "
                  "lease so far (tokens/s, MFU, peak GPU memory, a profile) are in "
                  "[`results/speed_gpu_h200.md`](results/speed_gpu_h200.md).", ""]
    if companions:
        lines += companion_sections()
    return "\n".join(lines)


RESULTS_MD = (REPO / "benchmarks" / "RESULTS.md").resolve()
# Tables other benchmarks write beside their JSON, shown in RESULTS.md under these headings.
COMPANIONS = (("Quality per step: does the speed cost accuracy?", "quality_per_step.md"),
              ("Upstream kernels against llmtune's", "head_kernels.md"))


def companion_sections() -> list[str]:
    lines = []
    for title, name in COMPANIONS:
        path = REPO / "benchmarks" / "results" / name
        if path.is_file():
            lines += [f"## {title}", "", path.read_text().strip(), ""]
    return lines + grpo_section() + profile_section()


def grpo_section() -> list[str]:
    """The grpo workload (benchmarks/grpo_speed.py): sampled completions per second against trl's script."""
    path = REPO / "benchmarks" / "results" / "grpo_speed.json"
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    base = next((r for r in record["results"] if r["system"] == "trl_script"), None)
    settings = record["settings"]
    lines = ["## Online RL (GRPO)", "",
             f"`benchmarks/grpo_speed.py --steps {settings['steps']}`: SmolLM2-135M-Instruct LoRA, "
             f"{settings['num_generations']} completions per prompt, {settings['max_completion_length']} new tokens, "
             f"batch {settings['batch_size']} x {settings['accumulation']}; each system in a fresh process, the steps "
             f"after a warm-up one; {record['cpu']}, {record['threads']} threads, {record['date']}.", "",
             "| system | sampled completions/s | vs trl_script | s/step | peak RSS (MB) | precision | activation ckpt |",
             "|---|---|---|---|---|---|---|"]
    for r in record["results"]:
        ratio = f"{r['completions_per_s'] / base['completions_per_s']:.2f}x" if base else "-"
        lines.append(f"| {r['system']} | {r['completions_per_s']:.2f} | {ratio} | {r['seconds_per_step']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['precision']} | {'on' if r['activation_checkpointing'] else 'off'} |")
    return lines + [""]


CATEGORIES = ("matmul", "LoRA matmul", "output head", "loss", "attention", "elementwise", "optimizer", "other")


def profile_section() -> list[str]:
    """Where a training step's time goes, from benchmarks/profile_step.py's files: operator time by category."""
    profiles = sorted((REPO / "benchmarks" / "results").glob("profile_*.json"))
    if not profiles:
        return []
    lines = ["## Where the time goes", "",
             "`benchmarks/profile_step.py`: operators' own time over a few training steps, by category (matmul: the "
             "model's frozen or trained weights; on a GPU, host time included). Files written before the machine "
             "was recorded say `-`; the README names them.", "",
             "| file | workload | system | precision | machine | s/step | " + " | ".join(CATEGORIES) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(CATEGORIES)]
    for path in profiles:
        record = json.loads(path.read_text())
        total = sum(record["by_category"].values()) or 1.0
        shares = " | ".join(f"{record['by_category'].get(c, 0.0) / total:.0%}" for c in CATEGORIES)
        lines.append(f"| {path.name} | {record['workload']} | {record['system']} | {record.get('precision', 'fp32')} "
                     f"| {record.get('machine', '-')} | {record['seconds_per_step']:.2f} | {shares} |")
    return lines + [""]


def rewrite_results_md() -> None:
    """RESULTS.md again from the stored speed results, with the companion tables as they are now."""
    from llmtune.run.files import write_text

    stored = REPO / "benchmarks" / "results" / "speed.json"
    if stored.is_file():
        write_text(RESULTS_MD, render(json.loads(stored.read_text()), companions=True))


def _seconds(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "failed"


# Environment variables that hold torch's own kernels, MKL's GEMMs and oneDNN to an instruction set: with
# ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 LLMTUNE_CPU_BF16=0 an AVX-512
# machine runs the code an AVX2-only CPU would (at its own clock and caches), every system in fp32.
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "LLMTUNE_CPU_BF16")


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (1 GPU), {os.cpu_count()} CPU cores"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")),
                 platform.processor())
    from llmtune.run.precision import cpu_has_native_bf16

    limits = [f"{name}={os.environ[name]}" for name in ISA_LIMITS if os.environ.get(name)]
    if limits:  # the libraries' vector code held to an older instruction set: an AVX2-only CPU, emulated
        vector = (f"vector instructions limited by {' '.join(limits)} (torch's CPU capability: "
                  f"{torch.backends.cpu.get_cpu_capability()})")
    else:
        vector = "native bf16" if cpu_has_native_bf16() else "no native bf16 (no avx512_bf16/AMX)"
    return f"{model}, {torch.get_num_threads()} CPU threads, no GPU, {vector}"


def matmul_peak(repeats: int = 3) -> dict[str, float]:
    """Best GFLOP/s of a square matmul (torch.matmul or F.linear, whichever the backend runs faster); 8192 wide on
    a GPU, which a 2048-wide one leaves mostly idle."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 8192 if device == "cuda" else 2048
    peak = {}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, **({"fp16": torch.float16} if device == "cuda" else {})}
    for name, dtype in dtypes.items():
        a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
        best = float("inf")
        for op in (torch.matmul, torch.nn.functional.linear):
            op(a, b)
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                op(a, b)
                sync()
                best = min(best, time.perf_counter() - start)
        peak[name] = round(2 * size**3 / best / 1e9, 1)
        del a, b
    if device == "cuda":
        torch.cuda.empty_cache()  # the workers that run next need the GPU's memory, not this process's cache
    return peak


def _native_bf16() -> bool:
    from llmtune.run.precision import cpu_has_native_bf16

    return _cuda() or cpu_has_native_bf16()


if __name__ == "__main__":
    sys.exit(main())
