"""A model from zero: a byte-level BPE tokenizer trained on the corpus and a small GPT-2 or Llama config."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llmtune.config.schema import ScratchConfig
from llmtune.data.lm_tokenize import CHATML_TEMPLATE, CHATML_TOKENS
from llmtune.models.adapters import log_trainable_parameters

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (as GPT-2) trained on texts, with an eos token and the ChatML turn markers built in."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, *CHATML_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS,
        additional_special_tokens=list(CHATML_TOKENS),
    )
    wrapped.chat_template = CHATML_TEMPLATE  # so the model can be fine-tuned on chats right after pretraining
    logger.info("Trained a byte-level BPE tokenizer with %d tokens.", len(wrapped))
    return wrapped


def build_model(cfg: ScratchConfig, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    """A randomly initialised causal LM sized by the recipe's `scratch` section."""
    common = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}
    if cfg.architecture == "gpt2":
        config = GPT2Config(n_layer=cfg.layers, n_embd=cfg.hidden_size, n_head=cfg.heads, n_positions=cfg.context_length,
                            **common)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(num_hidden_layers=cfg.layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.heads,
                             intermediate_size=cfg.hidden_size * 4, max_position_embeddings=cfg.context_length,
                             tie_word_embeddings=True, **common)
        model = LlamaForCausalLM(config)
    log_trainable_parameters(model)
    return model
