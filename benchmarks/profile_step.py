"""Where a training step's time goes: one system on one speed-benchmark workload, profiled with torch.profiler
over a few optimizer steps after warm-up, its operators' own (self) time grouped into

- matmul: the frozen weight matmuls of the transformer blocks (mm/addmm/bmm/linear);
- LoRA matmul: those with the adapter rank as a dimension (x A^T, its B, and their gradients);
- output head: matmuls with a vocabulary-sized dimension (the LM head, trl's vocabulary tiles, their gradients);
- loss: log-softmax / cross-entropy and their gradients;
- attention: the scaled-dot-product kernels;
- elementwise: activations, norms, adds and multiplies, copies, casts, reductions;
- optimizer: the AdamW update and gradient clipping;
- other: everything else (indexing, data movement of the collator, autograd bookkeeping).

    .venv/bin/python benchmarks/profile_step.py                       # llmtune, SFT LoRA on SmolLM2
    .venv/bin/python benchmarks/profile_step.py --workload dpo --system trl_script
    python benchmarks/profile_step.py --size gpu       # on a CUDA machine: also GPU kernel time, and the host's share
Prints a table and writes benchmarks/results/profile_<workload>_<system>[_bf16].json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from speed_workloads import REPO, WORKLOADS, build, prepare  # noqa: E402
from transformers import TrainerCallback  # noqa: E402 - after the offline switches

ELEMENTWISE = ("add", "mul", "sub", "div", "silu", "gelu", "pow", "rsqrt", "mean", "sum", "copy_", "to", "_to_copy",
               "neg", "cat", "exp", "where", "fill_", "zero_", "clone", "sigmoid", "tanh", "softmax",
               "_softmax", "masked_fill", "lerp", "sqrt", "addcmul", "addcdiv", "cos", "sin", "threshold_backward",
               "silu_backward", "gelu_backward", "_softmax_backward_data", "embedding_dense_backward", "abs",
               "logsigmoid", "log_sigmoid_forward", "log_sigmoid_backward", "eq", "ne", "argmax", "max")
MATMUL = ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "_addmm_activation")
LOSS = ("log_softmax", "_log_softmax", "_log_softmax_backward_data", "nll_loss", "nll_loss_forward",
        "nll_loss_backward", "cross_entropy_loss", "gather", "logsumexp")
OPTIMIZER = ("_fused_adamw_", "_foreach_", "clip_grad_norm_", "_foreach_norm")


def category(name: str, shapes: list, rank: int) -> str:
    op = name.removeprefix("aten::")
    if op in MATMUL:
        dims = {d for shape in shapes if isinstance(shape, list) for d in shape}
        # no weight of these models is 8192 wide; the vocabulary and trl's 32768-column tiles of it are
        return "output head" if max(dims, default=0) >= 8192 else "LoRA matmul" if rank in dims else "matmul"
    if op in LOSS:
        return "loss"
    if "scaled_dot_product" in op or "attention" in op:  # SDPA and its flash, efficient and cuDNN kernels
        return "attention"
    if op.startswith("_foreach") or op in OPTIMIZER:
        return "optimizer"
    if op.rstrip("_") in ELEMENTWISE or op in ELEMENTWISE or "norm" in op:
        return "elementwise"
    return "other"


class Profile(TrainerCallback):
    """Profiles steps warmup+1 .. warmup+steps, then stops training."""

    def __init__(self, warmup: int, steps: int, cuda: bool):
        import torch

        self.warmup, self.steps, self.cuda = warmup, steps, cuda
        activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * cuda
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self.wall = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        import time

        import torch

        if self.cuda:
            torch.cuda.synchronize()
        if state.global_step == self.warmup:
            self.profiler.__enter__()
            self.wall = time.perf_counter()
        elif state.global_step == self.warmup + self.steps:
            self.wall = (time.perf_counter() - self.wall) / self.steps
            self.profiler.__exit__(None, None, None)
            control.should_training_stop = True
        return control


def device_time(events, profile: Profile, rank: int) -> dict:
    """On a GPU the question is first whether the step waits on the host: wall time per step against kernel time.
    Kernel time is summed over the GPU's own events (as the profiler's table totals it); by category, over the
    operators that launched the kernels."""
    from torch.autograd import DeviceType

    steps = profile.steps
    busy = sum(e.self_device_time_total for e in events
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6 / steps
    kernel: dict[str, float] = {}
    for event in events:
        if event.device_type == DeviceType.CPU and event.self_device_time_total:
            kind = category(event.key, event.input_shapes, rank)
            kernel[kind] = kernel.get(kind, 0.0) + event.self_device_time_total / 1e6 / steps
    if not busy:
        print("GPU: the profiler recorded no kernel time (is CUPTI available?)")
        return {}
    print(f"GPU: {profile.wall:.3f} s wall per step, {busy:.3f} s of it kernels ({100 * busy / profile.wall:.0f}% busy)")
    for kind, seconds in sorted(kernel.items(), key=lambda item: -item[1]):
        print(f"  {kind:<12} {seconds:7.3f} s  {100 * seconds / busy:5.1f}% of kernel time")
    print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=40))
    return {"wall_seconds_per_step": profile.wall, "kernel_seconds_per_step": busy, "kernel_by_category": kernel}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="sft_lora", choices=list(WORKLOADS))
    parser.add_argument("--size", choices=["cpu", "gpu"], default="cpu",
                        help="whose batch size to use; gpu also records CUDA kernel time (needs a CUDA device)")
    parser.add_argument("--system", default="llmtune")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: the machine's fastest, as speed.py's compared systems train")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from llmtune import load_recipe
    from llmtune.run.precision import resolved_precision

    workload = WORKLOADS[args.workload]
    import torch

    if args.size == "gpu" and not torch.cuda.is_available():
        parser.error("--size gpu profiles CUDA kernels, and this machine has no CUDA GPU; leave --size out (cpu) here")
    if args.size not in workload.batch_size:
        parser.error(f"--workload {args.workload} has no {args.size} batch size; pick --size "
                     f"{' or '.join(workload.batch_size)}")
    recipe = load_recipe(REPO / "recipes" / workload.recipe)
    run = argparse.Namespace(learning_rate=recipe.training.learning_rate, batch_size=workload.batch_size[args.size],
                             precision=resolved_precision(args.precision), compile=False)
    with tempfile.TemporaryDirectory(prefix="llmtune-profile-") as tmp:
        work = Path(tmp)
        prepare(args.workload, work, 2000)
        trainer = build(args.workload, args.system, run, work)
        profile = Profile(args.warmup, args.steps, cuda=args.size == "gpu")
        trainer.add_callback(profile)
        trainer.train()
    events = profile.profiler.key_averages(group_by_input_shape=True)
    gpu = device_time(events, profile, recipe.method.r) if profile.cuda else {}
    totals: dict[str, float] = {}
    by_operator: dict[str, float] = {}
    top: list[tuple[float, str, str]] = []
    for event in events:
        seconds = event.self_cpu_time_total / 1e6 / args.steps
        kind = category(event.key, event.input_shapes, recipe.method.r)
        totals[kind] = totals.get(kind, 0.0) + seconds
        by_operator[event.key] = by_operator.get(event.key, 0.0) + seconds
        top.append((seconds, event.key, str(event.input_shapes)[:90]))
    step = sum(totals.values())
    print(f"{args.workload} / {args.system} ({run.precision}): {step:.2f} s of operator time (host) per step "
          f"({args.steps} steps profiled)")
    for kind, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {kind:<12} {seconds:7.3f} s  {100 * seconds / step:5.1f}%")
    operators = sorted(by_operator.items(), key=lambda item: -item[1])[:20]
    print("Top operators, all shapes (s per step):")
    for key, seconds in operators:
        print(f"  {seconds:7.3f}  {key:<36} {category(key, [], 0)}")
    print("Top operator calls by shape (s per step):")
    for seconds, key, shapes in sorted(top, reverse=True)[:15]:
        print(f"  {seconds:7.3f}  {key:<36} {shapes}")
    suffix = ("" if run.precision == "fp32" else f"_{run.precision}") + ("_gpu" if profile.cuda else "")
    out = Path(args.out or REPO / "benchmarks" / "results" / f"profile_{args.workload}_{args.system}{suffix}.json")
    from speed import machine

    out.write_text(json.dumps({"workload": args.workload, "system": args.system, "precision": run.precision,
                               "machine": machine(), "seconds_per_step": step, **({"gpu": gpu} if gpu else {}),
                               "by_category": totals, "by_operator": dict(operators),
                               "top": [{"seconds": s, "op": k, "shapes": sh} for s, k, sh in sorted(top, reverse=True)[:30]]},
                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
