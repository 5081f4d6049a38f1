"""Training FLOPs per token, counted from what a method must compute, for an MFU that means the same thing for
full fine-tuning and adapters.

6 x N per token (forward 2N, backward 4N) holds when every weight gets a gradient. An adapter run computes less:
a frozen weight still multiplies forward (2n) and passes the gradient to its input (2n), but gets no weight
gradient (the 2n it saves), so LoRA costs about 4 x N_frozen + 6 x N_adapters per token. Counted here, per linear
layer of the model as built:
- every linear weight (4-bit ones unpacked): 2n forward + 2n input gradient + 2n weight gradient if it trains;
- the output head (and a classifier's pooler / score layer) only where it is applied: the positions that carry a
  loss (an SFT run scores answer tokens only; a classifier one position per sequence);
- attention: per layer 4 x width multiply-adds per (query, key) pair forward and twice that backward, over the
  pairs each document really has (s(s+1)/2 causal, s^2 bidirectional) - padding and packing neighbours excluded.
These are the model FLOPs of the workload, the same for every system that trains it: recomputation by activation
checkpointing is not counted (it is the system's overhead), so MFU ratios equal speed ratios.

`counted_flops` measures one training step with torch's own FLOP counter, the cross-check that the analytic count
matches what autograd executes (tests/test_benchmark_budget.py runs it on a tiny model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

HEAD_NAMES = re.compile(r"(^|\.)(pooler|classifier|score|lm_head)(\.|$)")


@dataclass
class Linear:
    name: str
    weights: int
    trainable: bool
    head: bool


@dataclass
class TokenStats:
    """What the FLOP count needs from the training batches: attended tokens, (query, key) pairs and head positions."""

    causal: bool
    tokens: int = 0
    pairs: int = 0
    head_positions: int = 0
    documents: list[int] = field(default_factory=list)

    def add(self, batch: dict[str, Any]) -> None:
        lengths = document_lengths(batch)
        self.documents += lengths
        self.tokens += sum(lengths)
        self.pairs += sum(s * (s + 1) // 2 if self.causal else s * s for s in lengths)
        labels = batch.get("labels")
        if "completion_mask" in batch:  # DPO: log-probabilities of the replies' tokens only
            self.head_positions += int(batch["completion_mask"][..., 1:].sum())
        elif labels is None:
            self.head_positions += sum(lengths)
        elif labels.dim() == 1:  # a classifier: one pooled position per sequence
            self.head_positions += len(labels)
        else:  # a causal LM: the positions whose next token carries a loss
            self.head_positions += int((labels[..., 1:] != -100).sum())


def document_lengths(batch: dict[str, Any]) -> list[int]:
    """Each document's attended length: split at position_ids resets when a padding-free batch packs several in a
    row, else the attention mask's row sums, else the full rows."""
    import torch

    ids = batch["input_ids"]
    positions, mask = batch.get("position_ids"), batch.get("attention_mask")
    if positions is not None and mask is None:
        starts = [(row == 0).nonzero().flatten().tolist() + [len(row)] for row in positions]
        return [b - a for row in starts for a, b in zip(row, row[1:]) if b > a]
    if mask is not None:
        return [int(n) for n in torch.as_tensor(mask).sum(dim=1) if n > 0]
    return [ids.shape[1]] * ids.shape[0]


def linear_layers(model: Any) -> list[Linear]:
    """Every weight matrix that multiplies activations, once (a peft wrapper's base layer and adapters, not the
    wrapper), marked trainable or frozen and head (applied only at loss positions) or body."""
    from llmtune.models.adapters import unpacked_numel

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (hasattr(module, "base_layer") or weight is None or weight.dim() != 2 or "Embedding" in type(module).__name__
                or "original_module" in name):  # peft keeps an unused copy of a head it trains (modules_to_save)
            continue
        if "Linear" not in type(module).__name__ and type(module).__name__ != "Conv1D" and module is not head:
            continue
        is_head = module is head or bool(HEAD_NAMES.search(name))
        found.append(Linear(name, unpacked_numel(weight), weight.requires_grad, is_head))
    return found


def is_causal(model: Any) -> bool:
    """A decoder (its attention sees only earlier tokens) rather than an encoder."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "CausalLM" in type(base).__name__ or "LMHead" in type(base).__name__


def attention_shape(model: Any) -> tuple[int, int]:
    """(layers, attention width = heads x head size) from the model's config."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, heads * head_dim


def training_flops(model: Any, stats: TokenStats, reference_forward: bool = False) -> float:
    """The model FLOPs of training on the counted batches (see the module's docstring). `reference_forward`: DPO's
    reference pass comes on top (a forward of the adapter-off model, or of a full copy)."""
    body = head = 0.0
    found = linear_layers(model)
    adapters = any(not layer.trainable for layer in found)  # then the reference is the adapter-off model
    for layer in found:
        in_reference = reference_forward and not (adapters and layer.trainable)
        per_use = 2 * layer.weights * (3 if layer.trainable else 2) + (2 * layer.weights if in_reference else 0)
        if layer.head:
            head += per_use * stats.head_positions
        else:
            body += per_use * stats.tokens
    layers, width = attention_shape(model)
    attention = layers * 4 * width * stats.pairs * (3 + (1 if reference_forward else 0))
    return body + head + attention


def flops_per_token(model: Any, stats: TokenStats, reference_forward: bool = False) -> float:
    return training_flops(model, stats, reference_forward) / max(stats.tokens, 1)


def counted_flops(model: Any, loss_of: Any, batch: dict[str, Any]) -> int:
    """torch's FLOP counter over one forward and backward: `loss_of(model, batch)` returns the loss."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss_of(model, batch).backward()
    return counter.get_total_flops()
