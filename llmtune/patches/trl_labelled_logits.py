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
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from llmtune.patches.trl_compact_lm_head import fused_head_breaks_fsdp2

IGNORE = -100


class LMTrainer(SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.labelled_logits_only = "logits_to_keep" in inspect.signature(model.forward).parameters and (
            not torch.cuda.is_available() or (self.is_fsdp_enabled and fused_head_breaks_fsdp2())
        )
        self._token_hits: dict[str, list[torch.Tensor]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self.labelled_logits_only:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        targets = inputs["labels"][:, 1:]  # the token each position predicts
        keep = (targets != IGNORE).any(dim=0).nonzero().flatten()
        forward = {key: value for key, value in inputs.items() if key != "labels"}
        logits = model(**forward, use_cache=False, logits_to_keep=keep).logits
        targets = targets[:, keep]
        summed = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        labelled = targets != IGNORE
        # Like trl and Trainer: num_items_in_batch counts the labelled tokens of the whole optimizer step (all
        # accumulation micro-batches, all ranks), and DDP averages gradients across ranks.
        loss = summed / (labelled.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        with torch.no_grad():
            hits = torch.stack([((logits.argmax(-1) == targets) & labelled).sum(), labelled.sum()])
        mode = "train" if model.training else "eval"
        self._token_hits.setdefault(mode, []).append(self.accelerator.gather_for_metrics(hits.view(1, 2)).sum(0))
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        hits = self._token_hits.pop(mode, None)
        if hits:
            correct, count = torch.stack(hits).sum(0).tolist()
            # trl reports its evaluation metrics under "eval_" whatever the evaluation's own prefix
            logs[("eval_" if mode == "eval" else "") + "mean_token_accuracy"] = correct / max(count, 1)
        super().log(logs, start_time)
