"""trl's SFTTrainer, scoring only the positions that carry loss when it runs off CUDA.

In instruction tuning most prompt tokens carry no loss, yet a causal LM projects every position through its
output head (576 x 49k for SmolLM2: a fifth of the model's work per token) and trl then scores them all, with an
entropy over the whole vocabulary on top. trl's fused head skips unlabelled positions only on Triton devices, so on
CUDA it is used as is; elsewhere this trainer asks the model for the labelled positions' logits only
(`logits_to_keep`) and computes the same token-summed cross entropy and token accuracy from them. So it does on
CUDA under FSDP with torch < 2.13, where the fused head, which never calls the output head module, breaks FSDP2's
gathering of the tied embedding group (`trl_compact_lm_head.fused_head_breaks_fsdp2`).

It overrides SFTTrainer's `compute_loss` and `log` and relies on two trl behaviours: the loss is summed over
labelled tokens and divided by `num_items_in_batch`, and token accuracy is reported as `mean_token_accuracy`
(under "eval_" whatever prefix evaluate() was given). Canary:
tests/test_causal_lm.py::test_scoring_only_labelled_positions_matches_trl_loss_gradient_and_accuracy compares
this trainer with trl's own on the same batch and fails when trl's loss, gradient or metric changes.

With a frozen plain head (LoRA, QLoRA), the head and its cross entropy are computed a block of positions at a time,
with the gradient made on the way (`head_cross_entropy`). Scoring n positions of a 49k-token vocabulary the usual
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

import inspect

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from llmtune.patches.onednn_packed_linear import FrozenLinear
from llmtune.patches.trl_compact_lm_head import fused_head_breaks_fsdp2

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


# Causal LMs whose forward returns the head's output unchanged (Gemma 2 soft-caps it, Granite scales it).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "gpt2", "phi3", "olmo2", "gemma"})


class LMTrainer(SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.labelled_logits_only = "logits_to_keep" in inspect.signature(model.forward).parameters and (
            not torch.cuda.is_available() or (self.is_fsdp_enabled and fused_head_breaks_fsdp2())
        )
        self._token_hits: dict[str, list[torch.Tensor]] = {}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        # Scoring in blocks (`head_cross_entropy`) needs a frozen plain head whose output the model returns as is
        # (no soft-capping or scaling after it), whole on this process and run by nothing else (accelerate's device
        # hooks, as with a device_map, would be skipped along with the head's forward), and no compiled model
        # (dynamo would keep whichever head forward it first saw).
        self.head_in_blocks = (
            self.labelled_logits_only and type(head) is torch.nn.Linear and head.bias is None
            and not hasattr(head, "_hf_hook")
            and not head.weight.requires_grad and model.config.model_type in PLAIN_HEAD_MODEL_TYPES
            and not (self.is_fsdp_enabled or self.is_deepspeed_enabled or self.args.torch_compile)
        )
        self._head = head
        self._head_cast: tuple | None = None
        self._head_workspace = HeadWorkspace()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self.labelled_logits_only:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        targets = inputs["labels"][:, 1:]  # the token each position predicts
        keep = (targets != IGNORE).any(dim=0).nonzero().flatten()
        forward = {key: value for key, value in inputs.items() if key != "labels"}
        targets = targets[:, keep]
        labelled = targets != IGNORE
        if self.head_in_blocks:
            hidden, dtype = self._head_inputs(model, forward, keep)
            summed, hit_count = head_cross_entropy(hidden.flatten(0, 1), self._frozen_head(dtype), targets.flatten(),
                                                   self._head_workspace)
        else:
            logits = model(**forward, use_cache=False, logits_to_keep=keep).logits
            summed = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                     reduction="sum")
            with torch.no_grad():
                hit_count = ((logits.argmax(-1) == targets) & labelled).sum()
        # Like trl and Trainer: num_items_in_batch counts the labelled tokens of the whole optimizer step (all
        # accumulation micro-batches, all ranks), and DDP averages gradients across ranks.
        count = labelled.sum()
        loss = summed / (count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        hits = torch.stack([hit_count, count])
        mode = "train" if model.training else "eval"
        self._token_hits.setdefault(mode, []).append(self.accelerator.gather_for_metrics(hits.view(1, 2)).sum(0))
        return loss

    def _head_inputs(self, model, forward: dict, keep: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        """The model's forward pass up to its output head: the head's input at the `keep` positions, and the dtype
        the head would compute in there (autocast's, if on). For that one call the head's forward is replaced by one
        that keeps its input and returns no logits. A pre-hook handing the head zero positions would not be enough:
        under autocast `F.linear` still casts the whole frozen weight (28M values on SmolLM2, 14-18 ms of a 1 s CPU
        step), since autocast caches only casts of weights that need a gradient."""
        captured = []
        head = self._head

        def defer(hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            device = hidden.device.type
            autocast = torch.is_autocast_enabled(device)
            captured.append((hidden, torch.get_autocast_dtype(device) if autocast else head.weight.dtype))
            return hidden.new_empty(*hidden.shape[:-2], 0, head.out_features)

        own_forward = head.__dict__.get("forward")  # put back as found
        head.forward = defer
        try:
            model(**forward, use_cache=False, logits_to_keep=keep)
        finally:
            if own_forward is None:
                del head.forward
            else:
                head.forward = own_forward
        if not captured:
            raise RuntimeError("The model did not call the output head it had when the trainer was built (was the "
                               "model or its head replaced?); build the trainer again for the new model.")
        return captured[0]

    def _frozen_head(self, dtype: torch.dtype) -> FrozenLinear:
        """The frozen head weight in `dtype`, cast once (and packed for oneDNN where it can be) and again only if it
        changes (autocast would cast it in every step: a read and a write of 28M values on SmolLM2)."""
        return FrozenLinear.kept(self.__dict__, "_head_cast", self._head.weight, None, dtype)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        hits = self._token_hits.pop(mode, None)
        if hits:
            correct, count = torch.stack(hits).sum(0).tolist()
            # trl reports its evaluation metrics under "eval_" whatever the evaluation's own prefix
            logs[("eval_" if mode == "eval" else "") + "mean_token_accuracy"] = correct / max(count, 1)
        super().log(logs, start_time)
