"""Turn a loaded model into what `method` asks for: itself (full) or a LoRA / DoRA PeftModel (on a quantized base
for QLoRA), and report what is trained."""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from llmtune.config.schema import MethodConfig
from llmtune.errors import LlmtuneError
from llmtune.kernels.lora_linear import FusedLoraLinear
from llmtune.models.quantization import prepare_for_training
from llmtune.patches.peft_custom_module import use_lora_layer

logger = logging.getLogger(__name__)

LLAMA_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Adapter targets when the recipe names none. Attention projections are the classic LoRA choice and keep
# steps cheap; recipes that want the QLoRA paper's setting ask for all-linear.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                     "olmo", "olmo2", "smollm3", "granite"), LLAMA_ATTENTION),
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn"],
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "deberta-v2"), ["query", "value"]),
    "distilbert": ["q_lin", "v_lin"],
}


def apply_method(
    model: torch.nn.Module, method: MethodConfig, task_type: TaskType, gradient_checkpointing: bool = False
) -> torch.nn.Module:
    """Wrap the model in adapters for lora/dora (after k-bit preparation of a quantized base); full: as is."""
    if method.type == "full":
        log_trainable_parameters(model)
        return model
    model = prepare_for_training(model, method, gradient_checkpointing)
    config = LoraConfig(
        task_type=task_type,
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=method.target_modules or default_target_modules(model.config.model_type),
        modules_to_save=method.modules_to_save,
        use_dora=method.type == "dora",
    )
    if method.type == "lora" and method.quantization == "none":
        # bitsandbytes layers subclass nn.Linear, so the fused layer is offered only where the base is a plain one.
        use_lora_layer(config, torch.nn.Linear, FusedLoraLinear)
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


def default_target_modules(model_type: str) -> list[str] | str:
    """llmtune's per-architecture default, else peft's, else every linear layer."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    return DEFAULT_TARGET_MODULES.get(model_type) or PEFT_DEFAULTS.get(model_type) or "all-linear"


def unpacked_numel(param: torch.nn.Parameter) -> int:
    """Number of values in a parameter; bitsandbytes packs two 4-bit values per stored byte."""
    return param.numel() * (2 if type(param).__name__ == "Params4bit" else 1)


def parameter_summary(model: torch.nn.Module) -> dict[str, int | float | list[str]]:
    """Trainable and total parameter counts (4-bit weights counted unpacked) and the adapted module names."""
    trainable = total = 0
    for param in model.parameters():
        count = unpacked_numel(param)
        total += count
        trainable += count if param.requires_grad else 0
    summary: dict[str, int | float | list[str]] = {
        "trainable": trainable, "total": total, "trainable_percent": round(100 * trainable / max(total, 1), 4)
    }
    if is_adapter(model):
        targets = set().union(*(c.target_modules for c in model.peft_config.values()))
        summary["adapted_modules"] = sorted({name.split(".")[-1] for name in targets})
    return summary


def log_trainable_parameters(model: torch.nn.Module) -> None:
    summary = parameter_summary(model)
    logger.info("Trainable parameters: %s of %s (%.2f%%)%s", f"{summary['trainable']:,}", f"{summary['total']:,}",
                summary["trainable_percent"],
                f" - adapters on {', '.join(summary['adapted_modules'])}" if "adapted_modules" in summary else "")


def is_adapter(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)
