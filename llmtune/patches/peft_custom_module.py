"""peft's hook for custom LoRA layers, used to plug in llmtune's fused LoRA linear layer.

`LoraConfig._register_custom_module` is documented in peft's developer guide ("custom models") but is underscored.
It maps a base layer type to the LoRA layer class peft builds for it; the mapping is not written to
adapter_config.json, so saved adapters stay plain peft adapters that load without llmtune.
Canary: tests/test_patches.py::test_peft_custom_module_hook_builds_our_layer_and_saves_a_plain_config.
"""

from __future__ import annotations

from typing import Any

from llmtune.patches import applied


def use_lora_layer(config: Any, base_type: type, lora_type: type) -> None:
    """Have peft build `lora_type` (a subclass of its LoRA layer) for every adapted `base_type` module."""
    applied(__name__)
    config._register_custom_module({base_type: lora_type})
