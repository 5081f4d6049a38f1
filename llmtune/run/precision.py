"""Which numeric precision a run trains and evaluates in, decided once and used the same way everywhere.

Training with bf16 autocast also evaluates in bf16 (the Trainer runs evaluation through the same autocast
wrapper). The precision is recorded in run.json, and `llmtune eval` / `predict` / `generate` score a run in the
precision it was evaluated in during training, so the numbers a run reports can be reproduced from its saved model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from llmtune.errors import LlmtuneError

# Overrides the CPU probe below: 1 = treat this CPU as having native bf16, 0 = as not. Lets the bf16 paths be
# exercised on any machine (the test suite's --cpu-bf16 option sets it) and pins a choice on a shared cluster.
CPU_BF16_ENV = "LLMTUNE_CPU_BF16"


def resolved_precision(precision: str) -> str:
    """fp32, bf16 or fp16. auto: bf16 on GPUs that support it and on CPUs with native bf16 matmuls
    (avx512_bf16 or AMX), where it runs several times faster than fp32; fp32 elsewhere - on other CPUs bf16 is
    emulated and slower than fp32."""
    import torch

    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        fast_bf16 = torch.cuda.is_bf16_supported() if on_gpu else cpu_has_native_bf16()
        return "bf16" if fast_bf16 else "fp32"
    if precision == "fp16" and not on_gpu:
        raise LlmtuneError(
            "'training.precision' is 'fp16', but there is no GPU: fp16 on a CPU runs at a tiny fraction of fp32 "
            "speed. Use training.precision=bf16 (CPUs with avx512_bf16 or AMX) or fp32."
        )
    return precision


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bf16 in hardware (Linux: the avx512_bf16 or amx_bf16 flag), unless
    LLMTUNE_CPU_BF16 says otherwise."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


@contextlib.contextmanager
def evaluation_precision(precision: str, device_type: str = "cpu") -> Iterator[None]:
    """Run the enclosed forward passes as a run's evaluation ran: bf16/fp16 autocast, or plain fp32."""
    if precision not in AUTOCAST_DTYPES:
        yield
        return
    import torch

    with torch.autocast(device_type, dtype=getattr(torch, AUTOCAST_DTYPES[precision])):
        yield
