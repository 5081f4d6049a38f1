"""The cross entropy of a frozen LM head, a block of positions at a time, with the gradient made on the way.

With a frozen plain head (LoRA, QLoRA), llmtune's SFT trainer (patches/trl_labelled_logits.py) scores only the
labelled positions with this kernel. Scoring n positions of a 49k-token vocabulary the usual
way materializes several (n x vocabulary) tensors - the logits in bf16, again in float32, their log-softmax, and in
the backward pass its gradient and that gradient in bf16: about 300 MB for SmolLM2's 400 answer tokens of a step.
Tensors that large are above glibc's mmap threshold (32 MB at most), so each is a fresh mapping, page-faulted in on
first touch and unmapped when freed: 48,000 page faults, and 0.08 s of system time, in every 1.1 s SFT LoRA step on
a CPU. Instead the model runs up to its head (whose own forward is skipped for that call) and, for each block of
positions whose float32 logits fit in 32 MB, computes the logits, their log-sum-exp, the loss terms, the hits for
token accuracy and, when a gradient is wanted, the gradient for the hidden states (softmax minus the one-hot
target, times the head weight) - which is all a frozen head's backward pass needs, so nothing of vocabulary width
outlives its block, and the block buffers are kept from step to step (`HeadWorkspace`). The arithmetic is what
autocast does to `F.cross_entropy(lm_head(h).float(), t, reduction="sum")`: the matmuls in the compute dtype,
softmax and sums in float32. A trained head (full fine-tuning, `modules_to_save`) also needs its weight gradient
and keeps the logits path, as do models that change the head's output (Gemma 2's soft-capping, Granite's scaling).
"""

from __future__ import annotations

import torch

from llmtune.kernels.frozen_linear import FrozenLinear

IGNORE = -100
# One block's float32 logits. Larger blocks keep the head's matmuls efficient (SmolLM2's head on an EPYC with
# avx512_bf16: 340 / 280 GFLOP/s forward / backward at 85 rows, 386 / 336 at 170); the block buffers are made once
# and kept (`HeadWorkspace`), so their size costs no page faults.
BLOCK_BYTES = 32 * 2**20


class HeadWorkspace:
    """The block buffers of `head_cross_entropy`, kept from one step to the next: a float32 block of logits and,
    for a head in a lower precision (bf16, fp16), the matmul's block in that dtype. Made fresh for every block, each
    would be a new mapping of the C allocator (they are above glibc's mmap threshold), page-faulted in on first
    touch."""

    def __init__(self) -> None:
        self._buffers: tuple | None = None

    def buffers(self, needed: int, block_rows: int, head: FrozenLinear) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Buffers of at least `needed` rows (at most `block_rows`) for blocks of `head`'s logits. The first are
        sized to the first call; once a call needs more, they grow to a whole block: made twice at most for one head
        weight's vocabulary, dtype and device (another makes them again)."""
        key = (head.out_features, head.dtype, head.device)
        kept = self._buffers
        if kept is not None and kept[0] == key and len(kept[1]) >= needed:
            return kept[1], kept[2]
        rows = needed if kept is None or kept[0] != key else block_rows
        self._buffers = None  # the old buffers go before the new ones are made
        logits = torch.empty(rows, head.out_features, dtype=torch.float32, device=head.device)
        compute = None if head.dtype == torch.float32 else torch.empty_like(logits, dtype=head.dtype)
        self._buffers = (key, logits, compute)
        return logits, compute


class _HeadCrossEntropy(torch.autograd.Function):
    """(summed cross entropy, hits) of `hidden @ weight^T` against `targets`; gradient for `hidden` only."""

    @staticmethod
    def forward(ctx, hidden, head, targets, want_grad, workspace):
        rows = max(1, BLOCK_BYTES // (4 * head.out_features))
        logits_buffer, compute_buffer = workspace.buffers(min(rows, hidden.shape[0]), rows, head)
        grad = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        hits = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            block, target = hidden[start:start + rows], targets[start:start + rows]
            scored = target != IGNORE
            picked = target.clamp(min=0).unsqueeze(1)
            logits = logits_buffer[:len(block)]
            # the compute dtype's product, then float32 (what autocast's `.float()` would give)
            product = head.forward(block.to(head.dtype), out=logits if compute_buffer is None
                                   else compute_buffer[:len(block)])
            if product.data_ptr() != logits.data_ptr():
                logits.copy_(product)
            picked_logit = logits.gather(1, picked).squeeze(1)
            best, guess = logits.max(dim=1)
            hits += ((guess == target) & scored).sum()
            probs = logits.sub_(best.unsqueeze(1)).exp_()  # unnormalized softmax, in the logits' memory
            sums = probs.sum(dim=1)
            total += torch.where(scored, best + sums.log() - picked_logit, 0).sum()  # log-sum-exp - target
            if grad is not None:
                probs.div_(sums.unsqueeze(1))
                probs.scatter_add_(1, picked, torch.full_like(picked, -1, dtype=probs.dtype))
                if not scored.all():
                    probs.masked_fill_(~scored.unsqueeze(1), 0)
                if compute_buffer is not None:
                    probs = compute_buffer[:len(block)].copy_(probs)
                grad[start:start + rows] = head.input_grad(probs)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(hits)
        return total, hits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, grad_hits):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None, None


def head_cross_entropy(hidden: torch.Tensor, head: FrozenLinear, targets: torch.Tensor,
                       workspace: HeadWorkspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross entropy of the frozen `head` (vocabulary x hidden, in the compute dtype, no bias) over
    `hidden` (positions x hidden) against `targets` (positions; -100 = not scored), and the number of scored
    positions whose most likely token is the target. Pass the same `workspace` in every step to reuse its buffers."""
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _HeadCrossEntropy.apply(hidden, head, targets, want_grad, workspace or HeadWorkspace())
