"""How llmtune loads a pretrained checkpoint for training: the same `from_pretrained` arguments, tokenizer set-up and
length check for every task."""

from __future__ import annotations

import logging
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from llmtune.config.schema import Recipe
from llmtune.errors import LlmtuneError
from llmtune.models.quantization import load_arguments as quantized_loading

logger = logging.getLogger(__name__)

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def source_arguments(recipe: Recipe) -> dict[str, Any]:
    """Where and how to read the checkpoint: revision and trust_remote_code (off unless the recipe turns it on)."""
    return {"revision": recipe.model.revision, "trust_remote_code": recipe.model.trust_remote_code}


def pretrained_arguments(recipe: Recipe, model_path: str, keep_unquantized: list[str] | None = None) -> dict[str, Any]:
    """Every keyword llmtune passes to `from_pretrained` for training: safetensors only, the recipe's dtype and
    source, and bitsandbytes quantization when the method asks for it."""
    source = source_arguments(recipe)
    return {"use_safetensors": True, "dtype": recipe.model.dtype, **source,
            **quantized_loading(recipe.method, model_path, keep_unquantized=keep_unquantized, **source)}


# Classification head names across encoders and decoders; kept out of quantization and trained in full precision.
CLASSIFIER_HEADS = ["classifier", "score"]


def label_arguments(labels: list[str]) -> dict[str, Any]:
    """The config keywords that size a classifier's head to `labels` and name its outputs."""
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


def pretrained_classifier(recipe: Recipe, model_path: str, labels: list[str], auto_class: Any,
                          keep_unquantized: list[str] | None = CLASSIFIER_HEADS, **loading: Any) -> Any:
    """A pretrained body with a new head sized to `labels` (text or image classifier, student or not), pruned as
    model.keep_layers / num_layers ask; the method (full / LoRA / DoRA) is the caller's next step."""
    from llmtune.models.pruning import prune_layers

    model = auto_class.from_pretrained(model_path, **label_arguments(labels), **loading,
                                       **pretrained_arguments(recipe, model_path, keep_unquantized=keep_unquantized))
    return prune_layers(model, recipe.model)


def load_tokenizer(path: str, recipe: Recipe) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, **source_arguments(recipe))
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a tokenizer without a pad token one it already has (padding positions never carry loss)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        logger.warning("The tokenizer has no pad token; padding with %r (padded positions carry no loss).",
                       tokenizer.pad_token)


def check_max_length(recipe: Recipe, model_path: str) -> None:
    """Refuse a data.max_length longer than the checkpoint has position embeddings for (it would fail at the first
    long batch); for rotary-position models, which run past it with degrading quality, warn instead."""
    config = AutoConfig.from_pretrained(model_path, **source_arguments(recipe))
    config = getattr(config, "text_config", None) or config
    positions = next((getattr(config, key) for key in POSITION_KEYS if isinstance(getattr(config, key, None), int)),
                     None)
    max_length = recipe.data.max_length
    if positions is None or max_length <= positions:
        return
    rotary = any(getattr(config, key, None) is not None for key in ("rope_theta", "rope_scaling", "rope_parameters"))
    message = (f"'data.max_length' is {max_length}, but '{recipe.model.name}' has positions for {positions} tokens "
               f"({type(config).__name__}).")
    if rotary:
        logger.warning("%s Its rotary positions run longer, but quality past its training length is not assured.",
                       message)
        return
    raise LlmtuneError(f"{message} Set data.max_length to {positions} or less.")
