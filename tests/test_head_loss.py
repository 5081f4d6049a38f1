"""The output head's cross entropy computed in blocks must give what scoring all logits at once gives - summed
loss, gradient for the hidden states, token hits - in float32 and under bf16, and keep nothing vocabulary-wide."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmtune.kernels import head_loss
from llmtune.kernels.frozen_linear import FrozenLinear
from llmtune.kernels.head_loss import IGNORE, head_cross_entropy


def reference(hidden, weight, targets, dtype):
    """What autocast makes of `F.cross_entropy(lm_head(h).float(), t, reduction="sum")`, and the token hits."""
    logits = (hidden.to(dtype) @ weight.to(dtype).T).float()
    hits = ((logits.argmax(-1) == targets) & (targets != IGNORE)).sum()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum"), hits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_give_the_loss_gradient_and_hits_of_the_whole_logits(dtype, monkeypatch):
    torch.manual_seed(0)
    vocabulary, width, positions = 500, 32, 230
    monkeypatch.setattr(head_loss, "BLOCK_BYTES", 4 * vocabulary * 64)  # 64 positions a block: 4 blocks, 1 short
    weight = torch.randn(vocabulary, width)
    hidden = torch.randn(positions, width, requires_grad=True)
    targets = torch.randint(0, vocabulary, (positions,))
    targets[::5] = IGNORE
    # half the scored targets are the most likely token, so the hit count is not trivially 0
    with torch.no_grad():
        likely = (hidden.to(dtype) @ weight.to(dtype).T).float().argmax(-1)
    targets[1::2] = torch.where(targets[1::2] == IGNORE, IGNORE, likely[1::2])

    summed, hits = head_cross_entropy(hidden, FrozenLinear.cast(weight, None, dtype), targets)  # packed where it can be
    (summed / 7).backward()
    grad, hidden.grad = hidden.grad, None
    want, want_hits = reference(hidden, weight, targets, dtype)
    (want / 7).backward()

    assert hits.item() == want_hits.item() > 50
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the 1/7 is applied before or after its rounding
    torch.testing.assert_close(summed, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, hidden.grad, rtol=tolerance, atol=tolerance * hidden.grad.abs().max().item())
    assert grad[::5].abs().max() == 0 and grad[1::5].abs().max() > 0  # unscored positions get no gradient


def test_nothing_vocabulary_wide_is_kept_for_the_backward_pass_and_no_gradient_is_made_without_one():
    torch.manual_seed(0)
    weight, targets = FrozenLinear(torch.randn(4000, 16)), torch.randint(0, 4000, (50,))
    hidden = torch.randn(50, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        summed, _ = head_cross_entropy(hidden, weight, targets)
    assert saved and all(shape.numel() <= hidden.numel() for shape in saved), saved  # 50 x 16, not 50 x 4000
    with torch.no_grad():
        again, _ = head_cross_entropy(hidden, weight, targets)
    assert again.item() == pytest.approx(summed.item(), rel=1e-6) and not again.requires_grad


def test_a_kept_workspace_gives_the_same_results_and_is_made_at_most_twice(monkeypatch):
    """The trainer passes one workspace every step: its block buffers are reused (no fresh allocation, so no page
    faults for them), grow once to a whole block when a step needs more, and never change a result."""
    from llmtune.kernels.head_loss import HeadWorkspace

    torch.manual_seed(0)
    monkeypatch.setattr(head_loss, "BLOCK_BYTES", 4 * 300 * 40)  # blocks of 40 positions of a 300-token vocabulary
    weight = FrozenLinear.cast(torch.randn(300, 16), None, torch.bfloat16)
    workspace, made = HeadWorkspace(), []
    for positions in (25, 25, 90, 30, 90):
        hidden = torch.randn(positions, 16, requires_grad=True)
        targets = torch.randint(0, 300, (positions,))
        summed, hits = head_cross_entropy(hidden, weight, targets, workspace)
        summed.backward()
        fresh, fresh_hits = head_cross_entropy(hidden.detach().requires_grad_(), weight, targets)
        assert summed.item() == fresh.item() and hits.item() == fresh_hits.item()
        logits, compute = workspace.buffers(1, 40, weight)
        if not made or made[-1] != (logits.data_ptr(), compute.data_ptr()):
            made.append((logits.data_ptr(), compute.data_ptr()))
        assert logits.dtype == torch.float32 and compute.dtype == torch.bfloat16
    assert len(made) == 2 and len(logits) == 40  # sized to the first call (25 rows), then to a whole block
