"""Which SDPA kernel a masked attention call should run on: forward + backward time of each PyTorch SDPA backend
for the masked shapes llmtune trains with, when every call brings a new sequence length (as padding-free rows and
padded batches do, step after step) and when the length repeats.

On an H200 (torch 2.11) PyTorch picked cuDNN's kernel for a masked call, and cuDNN builds a plan for each new
length: 96 ms per call against the memory-efficient kernel's 0.85 ms on a 1,700-token padding-free row
(benchmarks/results/speed_gpu_h200.md). llmtune's one-call padding-free attention therefore runs off cuDNN. This
script measures the other masked shapes (padded preference and classification batches) before the same choice is
made for them.

    python3 benchmarks/sdpa_kernels.py                  # on a CUDA machine; prints a table, writes JSON
    .venv/bin/python benchmarks/sdpa_kernels.py --calls 3   # a CPU runs it too (its default and math kernels)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
# name -> (batch, heads, head dim, typical length, causal): SmolLM2-135M's attention (9 x 64) and MiniLM's (12 x 32)
SHAPES = {
    "padding-free SFT row (block-causal mask)": (1, 9, 64, 1700, True),
    "padded DPO batch (padding + causal mask)": (16, 9, 64, 350, True),
    "padded classification batch (padding mask)": (128, 12, 32, 64, False),
}
BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}


def mask_for(batch: int, length: int, causal: bool, device: str) -> torch.Tensor:
    """A boolean (batch, 1, length, length) mask like the one transformers passes SDPA: a padding-free row's
    samples of ~115 tokens each attend within themselves; a padded batch's rows have their own lengths."""
    index = torch.arange(length, device=device)
    if batch == 1:
        sample = index // 115
        return ((sample[:, None] == sample[None, :]) & (index[:, None] >= index[None, :]))[None, None]
    lengths = torch.linspace(length // 2, length, batch, device=device).long()
    keys = index[None, None, :] < lengths[:, None, None]  # (batch, 1, length): padding masked
    mask = keys & (index[:, None] >= index[None, :]) if causal else keys.expand(batch, length, length)
    return mask[:, None]


def seconds_per_call(shape: tuple, backend: SDPBackend | None, lengths: list[int], device: str,
                     dtype: torch.dtype) -> float:
    batch, heads, dim, _, causal = shape
    elapsed = 0.0
    for length in lengths:
        q, k, v = (torch.randn(batch, heads, length, dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        mask = mask_for(batch, length, causal, device)
        _sync(device)
        start = time.perf_counter()
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.sum().backward()
        _sync(device)
        elapsed += time.perf_counter() - start
    return elapsed / len(lengths)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20, help="Timed calls per measurement.")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sdpa_kernels.json"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    backends = BACKENDS if device == "cuda" else {"default": None, "math": SDPBackend.MATH}
    machine = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{machine}, torch {torch.__version__}, {dtype}; ms per forward + backward call")
    print(f"{'shape':<46} {'kernel':<10} {'new length':>11} {'same length':>12}")
    results = []
    for name, shape in SHAPES.items():
        typical = shape[3]
        new = [typical - 8 * i for i in range(args.calls)]  # a length not seen before, every call
        same = [typical] * args.calls
        for kernel, backend in backends.items():
            try:
                seconds_per_call(shape, backend, [typical + 1, typical + 2], device, dtype)  # warm up
                row = {"shape": name, "kernel": kernel,
                       "new_length_ms": 1000 * seconds_per_call(shape, backend, new, device, dtype),
                       "same_length_ms": 1000 * seconds_per_call(shape, backend, same, device, dtype)}
                print(f"{name:<46} {kernel:<10} {row['new_length_ms']:>11.2f} {row['same_length_ms']:>12.2f}",
                      flush=True)
            except RuntimeError as error:  # a backend that cannot run this shape says why
                row = {"shape": name, "kernel": kernel, "error": str(error).splitlines()[0][:200]}
                print(f"{name:<46} {kernel:<10} cannot run: {row['error'][:60]}", flush=True)
            results.append(row)
    Path(args.out).write_text(json.dumps({"device": machine, "torch": torch.__version__, "dtype": str(dtype),
                                          "calls": args.calls, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
