"""The tokenizer a causal-LM run trains with: the checkpoint's own (or one trained on the data for a model from
scratch), with a pad token and, for conversations, the chat template and its end-of-turn token."""

from __future__ import annotations

from typing import Any

from llmtune.config.schema import Recipe
from llmtune.data.lm_data import LMData, internal_form
from llmtune.data.lm_tokenize import setup_chat_template
from llmtune.models.loading import ensure_pad_token, load_tokenizer
from llmtune.models.scratch import train_tokenizer


def load_lm_tokenizer(recipe: Recipe, chat: bool, model_path: str | None,
                      lm_data: LMData | None = None) -> tuple[Any, bool]:
    """(tokenizer with pad token and chat template, whether tokens were added). With model.init=scratch a BPE
    tokenizer is trained on the training data (`lm_data`); otherwise the checkpoint's own is loaded."""
    if recipe.model.init == "scratch":
        if lm_data is None:
            raise ValueError("a tokenizer trained from scratch needs the training rows (lm_data)")
        train = internal_form(lm_data.splits["train"], lm_data.fmt, recipe.data, "the training data")
        corpus = (train["text"] if not lm_data.chat
                  else ("\n".join(m["content"] for m in row["messages"]) for row in train))
        tokenizer = train_tokenizer(iter(corpus), recipe.scratch.vocab_size)
        ensure_pad_token(tokenizer)
    else:
        tokenizer = load_tokenizer(model_path, recipe)
    added = setup_chat_template(tokenizer, recipe.lm.chat_template) if chat else False
    return tokenizer, added
