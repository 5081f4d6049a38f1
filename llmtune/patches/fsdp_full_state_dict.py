"""The final save of an FSDP run gathers the shards into one whole state dict through accelerate's plugin object.

Checkpoints during training may stay sharded (fast, resumable); the model left at the top of the run directory
must be one ordinary safetensors file that transformers loads. Trainer has no argument for "full state dict for
the final save only", so llmtune switches accelerate's FSDP plugin (`fsdp_plugin.set_state_dict_type`) just
before it. Canary: tests/test_patches.py::test_accelerate_fsdp_plugin_still_switches_state_dict_type (the save
itself needs GPUs: benchmarks/gpu_check.py).
"""

from __future__ import annotations

from typing import Any

from llmtune.patches import applied


def gather_full_state_dict_for_saving(trainer: Any) -> None:
    applied(__name__)
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
