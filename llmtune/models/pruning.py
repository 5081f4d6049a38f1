"""Structured pruning by layer removal: keep some of a checkpoint's transformer blocks and drop the rest.

The model left behind is the same architecture with fewer blocks (config.num_hidden_layers and, where the
architecture has one, its per-layer list shrink with it), so it saves and loads with plain transformers.
"""

from __future__ import annotations

import logging

from torch import nn

from llmtune.config.schema import ModelConfig
from llmtune.errors import LlmtuneError

logger = logging.getLogger(__name__)

# Where each family keeps its block list inside its base model: BERT-style encoders and ViT, Llama-style
# decoders, GPT-2.
BLOCK_LISTS = ("encoder.layer", "layers", "h")


def chosen_layers(model_cfg: ModelConfig, total: int) -> list[int] | None:
    """The blocks to keep (sorted), from model.keep_layers or model.num_layers; None when neither is set."""
    if model_cfg.keep_layers is not None:
        keep = sorted(set(model_cfg.keep_layers))
        if not keep or keep[0] < 0 or keep[-1] >= total:
            raise LlmtuneError(
                f"'model.keep_layers' is {model_cfg.keep_layers}, but '{model_cfg.name}' has {total} blocks, "
                f"numbered 0 to {total - 1}. Give at least one block number in that range."
            )
        return keep
    if model_cfg.num_layers is not None:
        if not 1 <= model_cfg.num_layers <= total:
            raise LlmtuneError(
                f"'model.num_layers' is {model_cfg.num_layers}, but '{model_cfg.name}' has {total} blocks. "
                f"Give a number from 1 to {total}."
            )
        return [round(i * total / model_cfg.num_layers) for i in range(model_cfg.num_layers)]
    return None


def prune_layers(model: nn.Module, model_cfg: ModelConfig) -> nn.Module:
    """Keep the blocks model.keep_layers / model.num_layers ask for (in place); the model as is when neither is set."""
    if model_cfg.keep_layers is None and model_cfg.num_layers is None:
        return model
    owner, name = _block_list(model)
    blocks = getattr(owner, name)
    keep = chosen_layers(model_cfg, len(blocks))
    setattr(owner, name, nn.ModuleList(blocks[i] for i in keep))
    config = model.config
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (Llama, Gemma, ...)
        config.layer_types = [config.layer_types[i] for i in keep]
    for position, block in enumerate(getattr(owner, name)):
        for module in block.modules():  # decoders index their KV cache by layer_idx
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    logger.info("Kept blocks %s of %d (model.%s).", keep, len(blocks),
                "keep_layers" if model_cfg.keep_layers is not None else "num_layers")
    return model


def _block_list(model: nn.Module) -> tuple[nn.Module, str]:
    base = getattr(model, model.base_model_prefix, model)  # e.g. BertForSequenceClassification.bert
    for path in BLOCK_LISTS:
        *parents, name = path.split(".")
        owner = base
        for part in parents:
            owner = getattr(owner, part, None)
        if isinstance(getattr(owner, name, None), nn.ModuleList):
            return owner, name
    raise LlmtuneError(
        f"model.keep_layers / model.num_layers: llmtune cannot find the block list of this "
        f"{model.config.model_type} model (looked for {', '.join(BLOCK_LISTS)}). Drop the setting for this checkpoint."
    )
