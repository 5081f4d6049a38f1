"""`llmtune data preview`: processed samples with every token marked trained or masked, plus statistics."""

from __future__ import annotations

import os
import sys
from typing import Any

from llmtune.config.schema import Recipe
from llmtune.errors import LlmtuneError

GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"
OPEN, CLOSE = "[[", "]]"  # marks trained tokens when the output is not a colour terminal


def preview(recipe: Recipe, samples: int = 3, colour: bool | None = None) -> str:
    """Render `samples` tokenized training samples and the training split's token statistics."""
    from llmtune.data.lm_data import packing_efficiency
    from llmtune.models.sources import resolve_source
    from llmtune.tasks import causal_lm

    if recipe.task not in ("sft", "pretrain"):
        raise LlmtuneError(
            f"data preview shows the loss masks of SFT / pretraining data, and this recipe's task is {recipe.task}. "
            "Use `llmtune validate` to see how its data is read."
        )
    if colour is None:
        colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    source = resolve_source(recipe)
    tokenizer, _, prepared = causal_lm.load_and_tokenize(recipe, source.path if source else None)
    encoded, train_stats = prepared.splits, prepared.stats["train"]
    if prepared.chat and recipe.lm.packing:
        train_stats["packing_efficiency"] = packing_efficiency(encoded["train"], recipe.data.max_length)

    legend = f"{GREEN}trained{RESET} {DIM}masked{RESET}" if colour else f"{OPEN}trained{CLOSE} masked"
    lines = [f"format: {prepared.fmt}, loss on: {prepared.loss_on}, max_length: {recipe.data.max_length}   ({legend})"]
    for index in range(min(samples, len(encoded["train"]))):
        row = encoded["train"][index]
        lines += ["", f"--- sample {index} ({len(row['input_ids'])} tokens, {sum(row['assistant_masks'])} trained) ---",
                  render_tokens(tokenizer, row["input_ids"], row["assistant_masks"], colour)]
    lines += ["", "statistics (training split):"]
    lines += [f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}" for key, value in train_stats.items()]
    return "\n".join(lines)


def render_tokens(tokenizer: Any, ids: list[int], mask: list[int], colour: bool) -> str:
    """The sample's text with each run of trained tokens highlighted (or bracketed)."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            text = tokenizer.decode(ids[start:i])
            if colour:
                out.append(f"{GREEN if mask[start] else DIM}{text}{RESET}")
            else:
                out.append(f"{OPEN}{text}{CLOSE}" if mask[start] else text)
            start = i
    return "".join(out)
