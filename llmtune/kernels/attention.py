"""Which attention kernel a causal LM trains with, and llmtune's per-sample SDPA for padding-free batches.

Padding-free batches put several samples in one row, with position ids restarting at each sample. Flash
attention (CUDA) reads those boundaries directly. PyTorch's SDPA cannot: transformers builds a block-diagonal
mask over the whole row, so attention costs (sum of lengths)^2 instead of the sum of length^2, and the mask
must be materialized. `sdpa_varlen` runs SDPA once per sample instead - the same numbers (the tests compare
them) at a fraction of the cost. It is registered through transformers' public AttentionInterface.

On a GPU a row of up to ONE_CALL_MAX_TOKENS tokens goes through one SDPA call with such a mask instead: there a
step is bound by kernel launches and host syncs, and the loop makes one call per sample per layer and syncs to
find the boundaries. That call is kept off cuDNN's attention kernel, which PyTorch prefers for masked SDPA but
which builds a new plan for every new row length. SmolLM2-135M LoRA on an H200 (batch 16, ~1,700-token rows,
bf16): 902 tokens/s with the loop, 2,706 with one call on cuDNN, 6,419 with one call on the memory-efficient
kernel, against a plain padded Trainer's 4,065-4,233 (benchmarks/results/speed_gpu_h200.md). Longer rows keep
the loop, whose sum(L^2) work then outweighs the launches. flash-attn's varlen kernel needs no mask at all and
is picked by auto where installed.

When training on a CPU under bf16 autocast it attends in float32: PyTorch's CPU flash-attention kernel is slower in
bf16 than in float32 at fine-tuning lengths, even with native bf16 matmuls (torch 2.13 on an AVX-512 EPYC with
avx512_bf16: forward + backward 2.3x slower at 100 tokens, 1.3x at 200, about level from 450), and float32 is the
more exact. Evaluation and generation (no gradients) keep autocast's bf16, as `llmtune eval` computes it.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

logger = logging.getLogger(__name__)

SDPA_VARLEN = "sdpa_varlen"
# SDPA turns a row's (N x N) mask into a bias in the query's dtype and keeps it for the backward pass: 32 MiB per
# layer at 4096 tokens in bf16; and the one call does up to N / L times the loop's attention work.
ONE_CALL_MAX_TOKENS = 4096
# With a mask, PyTorch 2.11 on an H200 picks cuDNN's kernel, which builds a plan for each new row length: 96 ms
# per new length (forward + backward) against the memory-efficient kernel's 0.85 ms, at ~1,700 tokens
# (benchmarks/sdpa_kernels.py times the kernels on this and the padded shapes).
MASKED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_varlen_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """SDPA per sample when one row holds several (position ids restart); plain SDPA for anything else.

    query/key/value are (batch, heads, length, head_dim). The varlen path needs one row whose queries and keys
    are the same tokens (training and evaluation - not generation with a cache).
    """
    training_shape = torch.is_grad_enabled() and query.shape[2] == key.shape[2]  # not evaluation or generation
    if query.device.type == "cpu" and torch.is_autocast_enabled("cpu") and training_shape:
        floating_mask = attention_mask is not None and attention_mask.is_floating_point()
        with torch.autocast("cpu", enabled=False):  # the next layer's matmuls cast the output back to bf16
            return sdpa_varlen_attention(module, query.float(), key.float(), value.float(),
                                         attention_mask.float() if floating_mask else attention_mask,
                                         position_ids, **kwargs)
    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    positions = position_ids.reshape(-1)
    if attends_in_one_call(query):
        with sdpa_kernel(MASKED_BACKENDS):
            return sdpa_attention_forward(module, query, key, value, block_causal_mask(positions), **kwargs)
    starts = (torch.diff(positions) != 1).nonzero().flatten() + 1
    if len(starts) == 0:  # one sample: causal attention needs no mask
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)
    bounds = [0, *starts.tolist(), query.shape[2]]
    lengths = [end - start for start, end in zip(bounds, bounds[1:])]
    pieces = [
        sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(pieces, dim=1), None  # (batch, length, heads, head_dim), like sdpa_attention_forward


def block_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """(1, 1, N, N) bool: each token attends to the earlier tokens of its own sample, the samples being where
    `positions` (N,) restart. Built on the positions' device, with no host sync."""
    sample = (torch.diff(positions, prepend=positions[:1] - 1) != 1).cumsum(0)
    return (sample[:, None] == sample[None, :]).tril_()[None, None]


def attends_in_one_call(query: torch.Tensor) -> bool:
    """Whether a padding-free row goes through one masked SDPA call rather than the per-sample loop: on a GPU, up
    to ONE_CALL_MAX_TOKENS tokens (see the module docstring)."""
    return query.device.type == "cuda" and query.shape[2] <= ONE_CALL_MAX_TOKENS


# The mask builder is SDPA's own, so batches that do take the plain SDPA path (padded evaluation, generation)
# get exactly the mask they would have had.
AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention)
AttentionMaskInterface.register(SDPA_VARLEN, sdpa_mask)


def attention_for(requested: str, padding_free: bool, precision: str) -> str:
    """The attention implementation to load the model with. auto: flash attention 2 on CUDA when the
    flash-attn package is installed and training runs in bf16/fp16 (its only dtypes), else per-sample SDPA for
    padding-free batches, else SDPA."""
    if requested != "auto":
        return requested
    flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if flash and precision in ("bf16", "fp16"):
        return "flash_attention_2"
    return SDPA_VARLEN if padding_free else "sdpa"
