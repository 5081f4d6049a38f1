"""A model loaded from a GGUF file refuses `save_pretrained` ("quantized with gguf and is not serializable").

transformers dequantizes GGUF weights into dense float tensors when loading, but keeps its GGUF quantizer attached
(`model.hf_quantizer`) and a `quantization_config` in the model config, and its save path refuses any model whose
quantizer is not serializable. The weights are ordinary dense tensors by then, so dropping both markers is what
makes them savable; the saved copy reloads with identical outputs.
Canary: tests/test_patches.py::test_gguf_loaded_model_still_refuses_to_save_without_the_patch (slow, real GGUF).
"""

from __future__ import annotations

import torch

from llmtune.patches import applied


def make_gguf_model_savable(model: torch.nn.Module) -> None:
    applied(__name__)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
