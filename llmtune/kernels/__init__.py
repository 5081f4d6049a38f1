"""llmtune's own compute kernels - the same arithmetic as the libraries' layers, in fewer passes - each checked
against the plain computation by the tests:

- `frozen_linear`: frozen weights laid out once for oneDNN's bf16 matmul on a CPU (`FrozenLinear`).
- `lora_linear`: a LoRA linear layer computing `x W^T + s (x A^T) B^T` and its gradients with one output tensor.
- `attention`: per-sample SDPA for padding-free rows (`sdpa_varlen`), and which attention a causal LM trains with.

Hooks that plug them into the libraries live in llmtune/patches/.
"""
