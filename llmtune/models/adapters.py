"""Turn a loaded model into what `method` asks for: itself (full) or a LoRA / DoRA PeftModel."""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from llmtune.config.schema import MethodConfig
from llmtune.errors import LlmtuneError

logger = logging.getLogger(__name__)


def apply_method(model: torch.nn.Module, method: MethodConfig, task_type: TaskType) -> torch.nn.Module:
    """Wrap the model in adapters for lora/dora; leave it whole for full fine-tuning."""
    if method.type == "full":
        log_trainable_parameters(model)
        return model
    config = LoraConfig(
        task_type=task_type,
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        # None lets peft pick the architecture's attention projections (its per-model default table).
        target_modules=method.target_modules,
        modules_to_save=method.modules_to_save,
        use_dora=method.type == "dora",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        linear = sorted({name.split(".")[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)})
        raise LlmtuneError(
            f"'method.target_modules' is {method.target_modules!r}, which does not fit this "
            f"{model.config.model_type} model ({exc}). Set it to 'all-linear' or to a list of its linear "
            f"layers: {', '.join(linear)}."
        ) from None
    log_trainable_parameters(peft_model)
    return peft_model


def log_trainable_parameters(model: torch.nn.Module) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("Trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)


def is_adapter(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)
