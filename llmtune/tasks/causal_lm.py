"""Causal LMs: instruction / chat SFT, continued pretraining, and pretraining from scratch.

The story, top to bottom: load the data -> tokenizer and model (pretrained, or trained/built from zero)
-> chat template and end-of-turn -> tokenize with loss masks (assistant turns or all tokens) -> model
(full, LoRA, DoRA) -> trl SFTTrainer (padding-free batches, no cross-sample attention). The pipeline
(llmtune/pipeline.py) then evaluates before (loss, perplexity, token accuracy), trains, evaluates after and saves
with a generation config whose eos is the template's end-of-turn token; this task adds the perplexity of
`lm.perplexity_file` and greedy generations at every evaluation.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from peft import TaskType
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import SFTConfig

from llmtune.config.schema import Recipe
from llmtune.data import tokenized_cache
from llmtune.data.files import read_text_file
from llmtune.data.lm_data import load_data, packing_efficiency, tokenize_splits
from llmtune.data.tokenized_cache import Tokenized
from llmtune.inference.generation import GenerationLogger, perplexity, set_generation_eos
from llmtune.kernels.attention import attention_for
from llmtune.models.adapters import apply_method
from llmtune.models.loading import pretrained_arguments
from llmtune.models.pruning import prune_layers
from llmtune.models.quantization import keep_adapters_in_compute_dtype
from llmtune.models.scratch import build_model
from llmtune.models.sources import ResolvedModel, cache_dir
from llmtune.models.tokenizers import load_lm_tokenizer
from llmtune.patches.trl_labelled_logits import LMTrainer
from llmtune.run.distributed import main_process_first
from llmtune.run.precision import resolved_precision
from llmtune.run.training import early_stopping, training_arguments
from llmtune.tasks.job import Job

logger = logging.getLogger(__name__)


def prepare_data(recipe: Recipe, model_path: str | None,
                 loaded: tuple[Any, bool] | None = None) -> tuple[Any, bool, Tokenized]:
    """(tokenizer, whether it gained tokens, the tokenized splits): from the cache of finished splits when an earlier
    run read the same files with the same settings (llmtune/data/tokenized_cache.py), else loaded and tokenized
    (and then cached). `loaded`: what load_lm_tokenizer already returned for this recipe and data, used instead of
    loading the tokenizer here (the speed benchmark times the data alone); it fills the same cache entry."""
    key = tokenized_cache.cache_key(recipe, model_path)
    folder = cache_dir() / "tokenized"
    cached = tokenized_cache.load(folder, key) if key else None
    if cached is not None:
        tokenizer, added = loaded or load_lm_tokenizer(recipe, cached.chat, model_path)
        return tokenizer, added, cached
    tokenizer, added, prepared = load_and_tokenize(recipe, model_path, loaded)
    if key:
        tokenized_cache.save(folder, key, prepared)
    return tokenizer, added, prepared


def load_and_tokenize(recipe: Recipe, model_path: str | None,
                      loaded: tuple[Any, bool] | None = None) -> tuple[Any, bool, Tokenized]:
    """The one load -> tokenize path (training, `llmtune validate`, `llmtune data preview`): raw rows of every split
    and the mixture, the tokenizer (`loaded` if given), and the loss-masked, tokenized splits with statistics."""
    lm_data = load_data(recipe)
    tokenizer, added = loaded or load_lm_tokenizer(recipe, lm_data.chat, model_path, lm_data)
    encoded, stats = tokenize_splits(recipe, lm_data, tokenizer)
    return tokenizer, added, Tokenized(encoded, stats, lm_data.fmt, lm_data.loss_on)


def build(recipe: Recipe, source: ResolvedModel | None, run_dir: Path, resume: bool = False) -> Job:
    """Load, tokenize and wrap everything into a ready-to-train LMTrainer (nothing is trained yet).
    `source` is the resolved checkpoint, or None for a model built from scratch."""
    data, lm = recipe.data, recipe.lm
    model_path = source.path if source else None

    with main_process_first():  # other processes then read the caches the first one wrote
        # 1. Data: raw rows -> tokenizer (chat template, pad token) -> loss-masked conversations or text blocks,
        # reused as a whole from an earlier run of the same data, tokenizer and settings
        tokenizer, added_tokens, prepared = prepare_data(recipe, model_path)
    encoded, stats, chat = prepared.splits, prepared.stats, prepared.chat

    # 2. Model (pretrained, or built from scratch) with the attention kernel for its batches
    padding_free = chat and (lm.padding_free or lm.packing)  # text blocks are all max_length: nothing to remove
    model = load_model(recipe, model_path, tokenizer, added_tokens, chat, padding_free)

    # 3. Method: full, LoRA or DoRA (QLoRA: on the quantized base)
    model = apply_method(model, recipe.method, TaskType.CAUSAL_LM, recipe.training.gradient_checkpointing)

    # 4. Trainer: trl builds labels from the masks and batches samples end to end without cross-sample attention
    packing = lm.packing and chat  # text blocks are already full
    args = training_arguments(
        recipe, str(run_dir), "loss", "eval" in encoded, resume, SFTConfig, padded=chat and not padding_free,
        # Samples are truncated at tokenization; trl refuses a max_length it would not enforce (padding-free
        # batches without packing).
        max_length=data.max_length if packing or not padding_free else None,
        packing=packing,
        packing_strategy="bfd",
        padding_free=padding_free,
        completion_only_loss=False,  # the assistant masks already say what is trained
        # Named, not left to trl's default: on CUDA trl's chunked head (nll) scores the labelled positions; off CUDA
        # patches/trl_labelled_logits.py scores them instead (benchmarks/head_kernels.py: trl's CPU path, which
        # scores every position, was 5x slower than llmtune's head loss; RESULTS.md).
        loss_type="nll",
        assistant_only_loss=False,
        dataset_num_proc=data.preprocessing_workers,
        include_num_input_tokens_seen="non_padding",  # tokens per second on the console and in the report
    )
    callbacks: list[TrainerCallback] = early_stopping(recipe.training)
    if lm.generation_prompts:
        callbacks.append(GenerationLogger(run_dir / "generations.jsonl", lm.generation_prompts, lm.max_new_tokens, chat))
    trainer = LMTrainer(
        model=model,
        args=args,
        train_dataset=encoded["train"],
        eval_dataset=encoded.get("eval"),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    keep_adapters_in_compute_dtype(trainer.model, recipe.method)  # before the optimizer is built, at train()
    if packing:
        stats["train"]["packing_efficiency"] = packing_efficiency(encoded["train"], data.max_length)

    def score_perplexity_file(run_dir: Path) -> dict[str, Any]:
        text = read_text_file(lm.perplexity_file, "lm.perplexity_file")
        return {"perplexity_file": perplexity(trainer.model, tokenizer, text, data.max_length, lm.stride)}

    return Job(trainer, model_path, summarize=lm_metrics,
               record={"token_stats": stats, "format": prepared.fmt, "loss_on": prepared.loss_on},
               metrics={"data": stats},
               after_training=score_perplexity_file if lm.perplexity_file else None)


def load_model(recipe: Recipe, model_path: str | None, tokenizer: Any, added_tokens: bool, chat: bool,
               padding_free: bool) -> Any:
    """The pretrained checkpoint (pruned as model.keep_layers / num_layers ask) or a model built from scratch, with
    the attention kernel for its batches, room for added tokens, and the template's end-of-turn as eos."""
    attention = attention_for(recipe.model.attention, padding_free, resolved_precision(recipe.training.precision))
    if model_path is None:
        model = build_model(recipe.scratch, tokenizer)
        model.set_attn_implementation(attention)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation=attention,
                                                     **pretrained_arguments(recipe, model_path))
        model = prune_layers(model, recipe.model)
    if added_tokens:
        model.resize_token_embeddings(len(tokenizer))
    set_generation_eos(model, tokenizer, chat)
    return model


def validate(recipe: Recipe, source: ResolvedModel | None) -> dict[str, Any]:
    """What `llmtune validate` reports: the data format and its token statistics as training would see them."""
    _, _, prepared = load_and_tokenize(recipe, source.path if source else None)
    return {"format": prepared.fmt, "loss_on": prepared.loss_on, "tokens": prepared.stats}


# --- pieces -------------------------------------------------------------------------------------------


def lm_metrics(raw: dict[str, float], prefix: str) -> dict[str, float]:
    loss = raw[f"{prefix}loss"]
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    # trl adds its token accuracy under "eval_" whatever the prefix asked of evaluate()
    for key in (f"{prefix}mean_token_accuracy", "eval_mean_token_accuracy"):
        if key in raw:
            metrics["token_accuracy"] = raw[key]
            break
    return metrics
