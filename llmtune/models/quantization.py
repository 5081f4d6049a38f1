"""Quantized loading through bitsandbytes (4-bit QLoRA, 8-bit) and k-bit training preparation.

The frozen base is loaded quantized; adapters (and the task head) train in full precision on top.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from llmtune.config.schema import MethodConfig
from llmtune.errors import LlmtuneError
from llmtune.patches.bnb_cpu_repacking import keep_4bit_weights_in_training_layout
from llmtune.patches.trl_adapter_dtype import adapters_back_to_float32
from llmtune.run.distributed import launched_with

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_arguments(
    method: MethodConfig, model_path: str, keep_unquantized: list[str] | None = None, **config_kwargs: Any
) -> dict[str, Any]:
    """Extra from_pretrained arguments for the recipe's quantization (none: no extra arguments).

    `keep_unquantized` names modules left in full precision (a freshly initialised task head must be, to
    train); `config_kwargs` (revision, trust_remote_code) are used to read the checkpoint's config.
    """
    if method.quantization == "none":
        return {}
    _require_bitsandbytes(method.quantization)
    from transformers import AutoConfig, BitsAndBytesConfig

    existing = getattr(AutoConfig.from_pretrained(model_path, **config_kwargs), "quantization_config", None)
    if existing:
        scheme = existing.get("quant_method", "unknown") if isinstance(existing, dict) else existing.quant_method
        if str(scheme) != "bitsandbytes":
            raise LlmtuneError(
                f"'method.quantization' is {method.quantization!r}, but the checkpoint '{model_path}' is already "
                f"quantized with {scheme}, which bitsandbytes cannot quantize again. Use method.quantization=none "
                "(the checkpoint loads in its own quantized form), or start from the unquantized checkpoint."
            )

    if method.quantization == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep_unquantized)
    else:
        compute = compute_dtype(method.compute_dtype)
        storage = DTYPES.get(method.quant_storage, compute if under_fsdp() else torch.uint8)
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            llm_int8_skip_modules=keep_unquantized,  # despite the name, 4-bit honours it too
            bnb_4bit_quant_type=method.quant_type,
            bnb_4bit_use_double_quant=method.double_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=storage,
        )
    arguments: dict[str, Any] = {"quantization_config": config}
    if under_fsdp() and method.quantization == "4bit":
        arguments["dtype"] = compute  # FSDP flattens each block into one buffer: one dtype throughout
    if torch.cuda.is_available():
        # Each process quantizes onto its own GPU; under DDP that is the local rank's device.
        from accelerate import PartialState

        arguments["device_map"] = {"": PartialState().local_process_index}
    return arguments


def under_fsdp() -> bool:
    return launched_with("FSDP")


def compute_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def prepare_for_training(model: torch.nn.Module, method: MethodConfig, gradient_checkpointing: bool) -> torch.nn.Module:
    """Check that layers were quantized, apply the CPU workaround, and make the model ready for k-bit training."""
    if method.quantization == "none":
        return model
    from peft import prepare_model_for_kbit_training

    quantized = count_quantized_layers(model)
    if quantized == 0:
        raise LlmtuneError(
            f"'method.quantization' is {method.quantization!r}, but bitsandbytes quantized none of this "
            f"{model.config.model_type} model's layers (it quantizes torch.nn.Linear layers, and this model has "
            "none it can take). Train it with method.quantization=none (LoRA on the full-precision model)."
        )
    keep_4bit_weights_in_training_layout(model)  # WORKAROUND: see llmtune/patches/bnb_cpu_repacking.py
    if under_fsdp():
        # peft's preparation upcasts norms and embeddings to fp32, which FSDP cannot flatten with the bf16
        # storage of the 4-bit weights; only let gradients reach the adapters through frozen inputs.
        model.enable_input_require_grads()
        if gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        # Casts layer norms and embeddings to fp32 and lets gradients reach the adapters through frozen inputs.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    logger.info("Quantized %d linear layers to %s", quantized, method.quantization)
    return model


def keep_adapters_in_compute_dtype(model: torch.nn.Module, method: MethodConfig) -> None:
    """Undo trl's bf16 adapters when the 4-/8-bit layers compute in float32 (see patches/trl_adapter_dtype.py)."""
    if method.quantization == "none" or compute_dtype(method.compute_dtype) != torch.float32:
        return
    adapters_back_to_float32(model)


def count_quantized_layers(model: torch.nn.Module) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for module in model.modules())


def _require_bitsandbytes(kind: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a backend library that fails to load
        raise LlmtuneError(
            f"'method.quantization' is {kind!r}, which needs bitsandbytes with a working backend, but importing "
            f"it failed ({type(exc).__name__}: {exc}). Install it with `pip install bitsandbytes` (CUDA, and CPU "
            "from version 0.48 on), or train without quantization: method.quantization=none."
        ) from None
