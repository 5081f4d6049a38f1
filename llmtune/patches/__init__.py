"""Every place llmtune relies on a library's private API or overrides its internals - and nowhere else.

Each module holds one such use, says why it is needed (a documented bug, a missing public hook), and is pinned by
a canary test (in tests/test_patches.py unless the module names another) that fails when the upstream behaviour it
relies on changes, so a library upgrade tells us which workaround to drop or adapt:

- `bnb_cpu_repacking`: bitsandbytes repacks 4-bit weights for CPU inference for good (gradients stop).
- `peft_custom_module`: peft's (underscored) hook that swaps in llmtune's fused LoRA layer.
- `gguf_save`: a GGUF-loaded model refuses `save_pretrained` until its quantizer marker is dropped.
- `trl_adapter_dtype`: trl stores a quantized model's adapters in bf16 even when the 4-bit layers compute in fp32.
- `trl_labelled_logits`: trl's SFTTrainer scoring only the positions that carry loss (off CUDA).
- `trl_compact_lm_head`: trl's fused LM head (DPO) projecting only the labelled positions on a CPU too.
- `fsdp_full_state_dict`: gathering FSDP shards for the final save through accelerate's plugin object.
- `interruptible_evaluation`: a stop signal ends an evaluation inside training; then the checkpoint is saved.
- `gguf_read_once`: one parse of a GGUF file while transformers loads a model and its tokenizer from it.
- `length_grouped_order`: a seeded generator for transformers' length-grouped sampler, so resumed runs see the
  same batches.
- `ifeval_without_nltk_data`: lm-eval's IFEval checkers offline, without nltk's downloadable tokenizer data.

Each hook calls `applied(__name__)` when it acts, so run.json lists the patches a run used (`patches`): a result
can be traced to the workarounds behind it.

llmtune's own kernels (frozen bf16 weights packed once, the fused LoRA matmul, the blockwise head cross entropy,
per-sample SDPA) live in llmtune/kernels/; the modules here only plug them, or a fix, into a library.
"""

from __future__ import annotations

_APPLIED: set[str] = set()


def applied(module: str) -> None:
    """Called by each patch module's hook when it acts: run.json lists the patches a run used (`patches`)."""
    _APPLIED.add(module.rsplit(".", 1)[-1])


def forget_applied() -> None:
    """Start a new record (a new run in the same process)."""
    _APPLIED.clear()


def in_use() -> list[str]:
    """The patches this process has used so far, by module name."""
    return sorted(_APPLIED)
