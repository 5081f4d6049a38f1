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

With a frozen plain head (LoRA, QLoRA), the head and its cross entropy are computed a block of positions at a time
by llmtune/kernels/head_loss.py (`head_cross_entropy`); a trained head (full fine-tuning, `modules_to_save`) keeps the
logits path, as do models that change the head's output (Gemma 2's soft-capping, Granite's scaling).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from llmtune.kernels.frozen_linear import FrozenLinear
from llmtune.kernels.head_loss import IGNORE, HeadWorkspace, head_cross_entropy
from llmtune.patches import applied
from llmtune.patches.trl_compact_lm_head import fused_head_breaks_fsdp2

# Causal LMs whose forward returns the head's output unchanged (Gemma 2 soft-caps it, Granite scales it).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "gpt2", "phi3", "olmo2", "gemma"})


class LMTrainer(SFTTrainer):
    def __init__(self, *args, **kwargs):
        applied(__name__)
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
