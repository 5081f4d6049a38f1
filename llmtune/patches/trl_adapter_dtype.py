"""trl's SFTTrainer stores a quantized model's trainable weights in bfloat16; llmtune puts them back in float32
when the 4-/8-bit layers compute in float32.

trl makes this cast (the QLoRA paper's choice, made for GPUs that compute in bf16) inside its constructor with no
setting to turn it off. With a float32 compute dtype - llmtune's default off bf16 GPUs - it costs twice: every adapter
matmul casts to bf16 and back (emulated, so slow, on CPUs without native bf16: 2.6x slower SmolLM2 QLoRA steps on
this project's CPU), and updates smaller than bf16's 8-bit mantissa are lost. The cast replaces the parameters'
storage (`param.data`) before the optimizer exists, so the optimizer sees the float32 tensors.
Canary: tests/test_patches.py::test_trl_still_casts_quantized_adapters_to_bf16.
"""

from __future__ import annotations

import torch

from llmtune.patches import applied


def adapters_back_to_float32(model: torch.nn.Module) -> int:
    """Cast trainable bf16/fp16 weights to float32 in place; return how many were cast."""
    applied(__name__)
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
            cast += 1
    return cast
