"""llmtune's own compute kernels - the same arithmetic as the libraries' layers, in fewer passes - each checked
against the plain computation by the tests:

- `frozen_linear`: frozen weights laid out once for oneDNN's bf16 matmul on a CPU (`FrozenLinear`).
- `lora_linear`: a LoRA linear layer computing `x W^T + s (x A^T) B^T` and its gradients with one output tensor.
- `head_loss`: the cross entropy of a frozen LM head a block of positions at a time, gradient made on the way.
- `attention`: per-sample SDPA for padding-free rows (`sdpa_varlen`), and which attention a causal LM trains with.

Hooks that plug them into the libraries live in llmtune/patches/.
"""
