"""Tokenization for causal LMs: chat templates, loss masks, truncation accounting and text blocks.

Loss masks come from the chat template itself: for each assistant turn, the conversation rendered up to
the turn's prompt and up to the turn's end are both prefixes of the whole rendering, so the characters in
between (the reply and its end-of-turn marker) are exactly what the model must learn to write. Each
segment is tokenized on its own, so mask boundaries are exact. A template for which the prefix property
fails cannot mark assistant tokens, and is reported instead of guessed at.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from llmtune.data.fingerprint import derived_fingerprint
from llmtune.errors import LlmtuneError

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def setup_chat_template(tokenizer: PreTrainedTokenizerBase, template: str | None) -> bool:
    """Install the recipe's chat template (ChatML when neither recipe nor tokenizer has one).

    Returns True when special tokens were added, so the caller must resize the model's embeddings.
    """
    if template is None and tokenizer.chat_template:
        return False
    if template is None or template == "chatml":
        if template is None:
            logger.info("The tokenizer has no chat template; using ChatML.")
        tokenizer.chat_template = CHATML_TEMPLATE
    elif template.endswith(".jinja"):
        if not Path(template).is_file():
            raise LlmtuneError(f"'lm.chat_template' is '{template}', but that file does not exist.")
        tokenizer.chat_template = Path(template).read_text()
    else:
        tokenizer.chat_template = template
    missing = [t for t in CHATML_TOKENS if t in tokenizer.chat_template and t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
        logger.info("Added %s to the vocabulary for the chat template.", ", ".join(missing))
        return True
    return False


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token id that closes an assistant turn in this chat template (what generation must stop on)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Fine."}]
    full = tokenizer.apply_chat_template(probe, tokenize=False)
    tail = full[full.rindex("Fine.") + len("Fine.") :]
    special = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder}
    for token in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if token in special:
            return token
    raise LlmtuneError(
        "The chat template closes assistant turns with no special end-of-turn token, so a fine-tuned model "
        "would not learn to stop. Use lm.chat_template=chatml or a template that ends each turn with a token "
        "such as the tokenizer's eos."
    )


def assistant_spans(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant reply (with its end-of-turn)."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        last = i == len(messages) - 1  # most rows end on the reply: the full render is the one up to it
        upto = full if last else tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(prompt) and full.startswith(upto) and len(prompt) < len(upto)):
            raise LlmtuneError(
                "lm.loss_on=assistant needs a chat template that renders each assistant turn as an addition to "
                "the conversation before it, and this one does not (it rewrites earlier turns or the prompt). "
                "Use lm.chat_template=chatml, give a template without that behaviour, or set lm.loss_on=all."
            )
        spans.append((len(prompt), len(upto)))
    return full, spans


def tokenize_conversation(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, loss_on: str, max_length: int
) -> dict[str, Any]:
    """input_ids and assistant_masks (1 = trained) for one conversation, truncated to max_length."""
    batch = tokenize_conversation_batch([messages], tokenizer, loss_on, max_length)
    return {key: values[0] for key, values in batch.items()}


def tokenize_conversation_batch(
    conversations: list[list[dict[str, str]]], tokenizer: PreTrainedTokenizerBase, loss_on: str, max_length: int
) -> dict[str, list]:
    """Each conversation's input_ids and assistant_masks. Prompt and reply pieces are tokenized separately - the
    way generation sees them, a prompt then new tokens - in one batched tokenizer call for the whole batch."""
    pieces: list[str] = []
    owners: list[tuple[int, int]] = []  # (conversation, trained) of each piece
    for row, messages in enumerate(conversations):
        text, spans = assistant_spans(messages, tokenizer)
        if loss_on == "all":
            spans = [(0, len(text))]
        cursor = 0
        for start, end in [*spans, (len(text), len(text))]:
            for piece, trained in ((text[cursor:start], 0), (text[start:end], 1)):
                if piece:
                    pieces.append(piece)
                    owners.append((row, trained))
            cursor = end
    ids: list[list[int]] = [[] for _ in conversations]
    masks: list[list[int]] = [[] for _ in conversations]
    encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
    for (row, trained), piece_ids in zip(owners, encoded):
        ids[row] += piece_ids
        masks[row] += [trained] * len(piece_ids)
    return {"input_ids": [i[:max_length] for i in ids], "assistant_masks": [m[:max_length] for m in masks],
            "truncated": [len(i) > max_length for i in ids]}


@dataclass
class TokenStats:
    samples: int
    dropped_no_trained_tokens: int
    truncated: int
    tokens: int
    trained_tokens: int
    dropped_empty_turn: int = 0  # conversations dropped before tokenizing (llmtune/data/formats.py)

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "truncation_rate": self.truncated / max(self.samples, 1),
            "trained_fraction": self.trained_tokens / max(self.tokens, 1),
        }


def tokenize_conversations(
    rows: Dataset, tokenizer: PreTrainedTokenizerBase, loss_on: str, max_length: int, split: str,
    num_proc: int | None = None,
) -> tuple[Dataset, TokenStats]:
    """Tokenize a 'messages' dataset; drop (and count) samples that truncation left with no trained token."""
    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        out = tokenize_conversation_batch(batch["messages"], tokenizer, loss_on, max_length)
        return {**out, "tokens": [len(ids) for ids in out["input_ids"]],
                "trained": [sum(mask) for mask in out["assistant_masks"]]}

    fingerprint = derived_fingerprint(rows, "conversations", __file__, tokenizer, loss_on=loss_on, max_length=max_length)
    encoded = rows.map(tokenize, batched=True, remove_columns=rows.column_names, num_proc=num_proc,
                       new_fingerprint=fingerprint,
                       desc=f"Tokenizing {split}")
    # Statistics from the small per-row columns: reading the token lists back row by row would cost more than
    # a cached run's whole preprocessing.
    counts = encoded.select_columns(["tokens", "trained", "truncated"]).to_dict()
    trained = counts["trained"]
    keep = [i for i, n in enumerate(trained) if n > 0]
    stats = TokenStats(
        samples=len(encoded),
        dropped_no_trained_tokens=len(encoded) - len(keep),
        truncated=sum(counts["truncated"]),
        tokens=sum(counts["tokens"]),
        trained_tokens=sum(trained),
    )
    if stats.dropped_no_trained_tokens:
        logger.warning(
            "%s: %d of %d samples had no trained token left after truncation to %d tokens; dropped them "
            "(raise data.max_length to keep them).", split, stats.dropped_no_trained_tokens, stats.samples, max_length,
        )
    if not keep:
        raise LlmtuneError(
            f"Every {split} sample lost all its trained tokens to truncation at data.max_length={max_length}. "
            "Raise data.max_length."
        )
    if len(keep) < len(encoded):
        encoded = encoded.select(keep)
    return encoded.remove_columns(["tokens", "trained", "truncated"]), stats


def repeat_drop_warnings(split: str, stats: dict[str, Any]) -> None:
    """On a run that reuses tokenized data: the rows its first tokenization dropped, said again (they are still
    missing from the data this run trains on)."""
    empty, untrained = stats.get("dropped_empty_turn", 0), stats.get("dropped_no_trained_tokens", 0)
    if empty or untrained:
        logger.warning("%s: %d conversations with an empty turn and %d samples with no trained token left after "
                       "truncation were dropped when this data was tokenized (counts in run.json token_stats).",
                       split, empty, untrained)


def tokenize_text_blocks(
    rows: Dataset, column: str, tokenizer: PreTrainedTokenizerBase, block_size: int, split: str,
    num_proc: int | None = None,
) -> tuple[Dataset, TokenStats]:
    """Plain text: each document + eos, concatenated and cut into block_size blocks (the tail is dropped)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def blocks(batch: dict[str, list]) -> dict[str, list]:
        stream = [t for text in batch[column] if text for t in tokenizer(text, add_special_tokens=False)["input_ids"] + eos]
        usable = len(stream) // block_size * block_size
        chunks = [stream[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": chunks, "assistant_masks": [[1] * block_size for _ in chunks]}

    # Large batches so that little text is lost at batch boundaries.
    fingerprint = derived_fingerprint(rows, "text-blocks", __file__, tokenizer, column=column, block_size=block_size)
    encoded = rows.map(blocks, batched=True, batch_size=2000, remove_columns=rows.column_names, num_proc=num_proc,
                       new_fingerprint=fingerprint,
                       desc=f"Tokenizing {split} into {block_size}-token blocks")
    if len(encoded) == 0:
        raise LlmtuneError(
            f"The {split} text is shorter than one block of data.max_length={block_size} tokens. "
            "Give more text or lower data.max_length."
        )
    tokens = len(encoded) * block_size
    return encoded, TokenStats(len(encoded), 0, 0, tokens, tokens)
