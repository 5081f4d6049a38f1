"""WORKAROUND: bitsandbytes 0.50 repacks 4-bit weights for CPU inference, for good.

On a CPU with avx512_bf16, `Linear4bit.forward` in eval mode with an input that does not require grad converts the
layer's weight to an inference-only layout and never converts it back. From then on:
- training: no gradient flows through those layers (the packed kernel is not differentiable; on CPUs without the
  kernel the unpacked-layout maths runs on packed data and the gradient is wrong) - with evaluation between steps,
  LoRA weights silently stop changing while a loss is still reported;
- small layers (a side shorter than the 64-value quantization block, e.g. tiny test models) crash with
  "shape '[32, 0]' is invalid";
- merging into that base is off by up to 1.1 in the logits;
- `llmtune eval` would score with a different kernel (bf16 gemv) than training's evaluation did.
Turning the repacking off on every 4-bit layer llmtune loads - for training and for inference - keeps one layout
and one set of numbers everywhere. Canary: tests/test_patches.py::test_bnb_still_repacks_4bit_weights_after_eval.
"""

from __future__ import annotations

import torch

from llmtune.patches import applied


def keep_4bit_weights_in_training_layout(model: torch.nn.Module) -> int:
    """Turn bitsandbytes' CPU repacking off on every 4-bit layer of the model; return how many layers."""
    applied(__name__)
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in layers:
        module.support_avx512bf16_for_cpu = False
    return len(layers)
