"""Knowledge distillation for classifiers: the loss, and the Trainer that applies it.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy(student, labels)

(Hinton et al. 2015; the T^2 keeps the soft term's gradients on the scale of the hard one as T changes.) The
teacher's logits arrive with each training batch (`teacher_logits`, computed once before training - see
tasks/distill.py); evaluation batches carry none and are scored with the plain cross-entropy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional
from transformers import Trainer


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float) -> torch.Tensor:
    """Mean over the batch of alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels); the
    cross-entropy is averaged over labelled rows (label >= 0) only."""
    student = functional.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = functional.log_softmax(teacher_logits.float() / temperature, dim=-1)
    soft = functional.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2
    labelled = labels >= 0  # rows of distill.transfer_file carry -1: the teacher's term only
    hard = (functional.cross_entropy(student_logits[labelled].float(), labels[labelled]) if labelled.any()
            else student_logits.sum() * 0.0)
    return alpha * soft + (1 - alpha) * hard


class DistillationTrainer(Trainer):
    """A Trainer whose training loss is `distillation_loss` against the batch's `teacher_logits`.

    transformers has no loss hook that sees extra batch columns (compute_loss_func gets outputs and labels only),
    so this overrides compute_loss, and nothing else.
    """

    def __init__(self, *args: Any, alpha: float, temperature: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.alpha, self.temperature = alpha, temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001 - Trainer's
        teacher_logits = inputs.pop("teacher_logits", None)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        if teacher_logits is None:
            loss = functional.cross_entropy(outputs.logits.float(), labels)
        else:
            loss = distillation_loss(outputs.logits, teacher_logits, labels, self.alpha, self.temperature)
        return (loss, outputs) if return_outputs else loss
