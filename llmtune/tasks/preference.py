"""Preference tuning of causal LMs: dpo, kto, orpo and simpo.

The story, top to bottom: load the pairs (or kto's unpaired feedback) in any common layout -> tokenizer with its
chat template -> drop what cannot teach (identical or empty replies, prompts with no room for a reply) -> model
(a checkpoint or an llmtune SFT run; full, LoRA, DoRA, QLoRA) -> trl's trainer for the task, with its reference
model (llmtune/tasks/preference_trainers.py). The pipeline then evaluates the held-out pairs before (preference accuracy,
reward margin, log-probabilities), trains, evaluates after and saves as for SFT.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from peft import PeftModel, TaskType
from transformers import AutoConfig, AutoModelForCausalLM

from llmtune.config.schema import Recipe
from llmtune.data.lm_tokenize import setup_chat_template
from llmtune.data.preference import chat_prompt_tokens, load_preference_splits
from llmtune.errors import LlmtuneError
from llmtune.inference.generation import GenerationLogger, set_generation_eos
from llmtune.inference.merge import merge_adapter
from llmtune.inference.trained import find_base
from llmtune.kernels.attention import attention_for
from llmtune.models.adapters import apply_method, log_trainable_parameters
from llmtune.models.loading import load_tokenizer, pretrained_arguments
from llmtune.models.quantization import keep_adapters_in_compute_dtype, prepare_for_training
from llmtune.models.sources import ResolvedModel, cache_entry, resolve_model
from llmtune.run.distributed import main_process_first
from llmtune.run.files import read_json
from llmtune.run.precision import resolved_precision
from llmtune.run.run_dir import RUN_RECORD
from llmtune.tasks.job import Job
from llmtune.tasks.preference_trainers import build_trainer, summarize

logger = logging.getLogger(__name__)

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "albert",
                 "mpnet", "modernbert")


def build(recipe: Recipe, source: ResolvedModel | None, run_dir: Path, resume: bool = False) -> Job:
    """Load, prepare and wrap everything into a ready-to-train trl trainer (nothing is trained yet)."""
    assert source is not None, "preference tasks start from a checkpoint (rules.py refuses model.init=scratch)"
    check_decoder(source.path, recipe)
    parent = sft_parent(source.path)

    # 1. Tokenizer with its chat template, then the data in the internal form (dropped rows counted)
    with main_process_first():
        tokenizer, added_tokens, splits, layout, dropped = load_data(recipe, source)

    # 2. Model: the checkpoint, or the SFT run's model (its adapter merged, or trained further)
    model, model_path, new_adapter = policy_model(recipe, source, parent, ("pref.sft_adapter", recipe.pref.sft_adapter),
                                                  tokenizer, added_tokens)

    # 3. Reference (dpo, kto) and trl's trainer; generations of lm.generation_prompts at every evaluation
    reference = None
    if recipe.pref.reference:
        reference = reference_model(recipe, attention_of(recipe))
    callbacks = []
    if recipe.lm.generation_prompts:
        callbacks.append(GenerationLogger(run_dir / "generations.jsonl", recipe.lm.generation_prompts,
                                          recipe.lm.max_new_tokens, chat=True))
    trainer = build_trainer(recipe, model, tokenizer, splits["train"], splits.get("eval"), run_dir, resume,
                            callbacks, reference, new_adapter)
    keep_adapters_in_compute_dtype(trainer.model, recipe.method)

    sizes = {split: len(rows) for split, rows in splits.items()}
    record = {"format": layout, "rows": sizes, "dropped": dropped}
    if parent:
        record["sft_parent"] = parent
    return Job(trainer, model_path, summarize=summarize(recipe.task), record=record,
               metrics={"data": {"rows": sizes, "dropped": dropped}},
               after_training=lambda run_dir: drop_reference_adapter(trainer.model))


def validate(recipe: Recipe, source: ResolvedModel | None) -> dict[str, Any]:
    """What `llmtune validate` reports: the data layout, rows kept and dropped per split."""
    assert source is not None
    check_decoder(source.path, recipe)
    _, _, splits, layout, dropped = load_data(recipe, source)
    return {"format": layout, "rows": {s: len(r) for s, r in splits.items()}, "dropped": dropped}


# --- pieces -------------------------------------------------------------------------------------------------


def load_data(recipe: Recipe, source: ResolvedModel) -> tuple[Any, bool, dict[str, Any], str, dict]:
    """(tokenizer with its chat template, whether that added tokens, the splits in the internal form, the layout,
    rows dropped per split and reason)."""
    tokenizer = load_tokenizer(source.path, recipe)
    added_tokens = setup_chat_template(tokenizer, recipe.lm.chat_template)
    splits, layout, dropped = load_preference_splits(recipe.data, recipe.training.seed, recipe.task != "kto",
                                                     chat_prompt_tokens(tokenizer), recipe.pref.max_prompt_length)
    return tokenizer, added_tokens, splits, layout, dropped


def check_decoder(path: str, recipe: Recipe) -> None:
    """Preference tasks tune a model that writes replies; an encoder cannot (a reward model can be one)."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code)
    if config.model_type in ENCODER_TYPES or getattr(config, "is_encoder_decoder", False):
        raise LlmtuneError(
            f"'model.name' is {recipe.model.name!r}, a {config.model_type} model, but task {recipe.task} tunes a "
            "decoder (causal LM) that writes replies. Use a decoder checkpoint (e.g. smollm2-135m-instruct or an "
            "SFT run), or task=reward to train this encoder as a reward model."
        )


def sft_parent(path: str) -> dict[str, Any] | None:
    """When model.name is an llmtune run directory: what it was (its task, base model, whether it is an adapter)."""
    folder = Path(path)
    if not (folder / RUN_RECORD).is_file():
        return None
    record = read_json(folder / RUN_RECORD)
    adapter = (folder / "adapter_config.json").is_file()
    return {"run_dir": str(folder), "task": record.get("recipe", {}).get("task"), "adapter": adapter,
            "base": record.get("model_path") if adapter else None,
            "base_name": record.get("recipe", {}).get("model", {}).get("name")}


def attention_of(recipe: Recipe) -> str:
    return attention_for(recipe.model.attention, False, resolved_precision(recipe.training.precision))


def policy_model(recipe: Recipe, source: ResolvedModel, parent: dict[str, Any] | None, sft_adapter: tuple[str, str],
                 tokenizer: Any, added_tokens: bool) -> tuple[Any, str, bool]:
    """The model a preference or RL task trains (see starting_model), sized for the tokenizer and stopping where
    chat replies end."""
    model, model_path, new_adapter = starting_model(recipe, source, parent, attention_of(recipe), sft_adapter)
    if added_tokens:
        model.resize_token_embeddings(len(tokenizer))
    set_generation_eos(model, tokenizer, chat=True)
    return model, model_path, new_adapter


def starting_model(recipe: Recipe, source: ResolvedModel, parent: dict[str, Any] | None, attention: str,
                   sft_adapter: tuple[str, str]) -> tuple[Any, str, bool]:
    """(model ready to train, the checkpoint its weights come from, whether its adapter is new). An SFT adapter run
    is merged into its base (`sft_adapter` = (recipe key, merge); the merged model is cached like a converted GGUF
    file) or its adapter is trained further (continue)."""
    method, path = recipe.method, source.path
    key, choice = sft_adapter
    continuing = bool(parent and parent["adapter"]) and choice == "continue"
    if parent and parent["adapter"] and not continuing:
        with main_process_first(local=True):
            path = str(merged_sft_model(Path(source.path)))
    elif continuing:
        if method.type == "full":
            raise LlmtuneError(
                f"'{key}' is 'continue' (train the SFT adapter further) but 'method.type' is 'full'. Use "
                f"method.type=lora, or {key}=merge to fine-tune the merged SFT model in full."
            )
        folder = Path(source.path)
        path = find_base(folder, read_json(folder / "adapter_config.json"), read_json(folder / RUN_RECORD), None)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention,
                                                 **pretrained_arguments(recipe, path))
    if not continuing:
        return apply_method(model, method, TaskType.CAUSAL_LM, recipe.training.gradient_checkpointing), path, True
    model = prepare_for_training(model, method, recipe.training.gradient_checkpointing)
    model = PeftModel.from_pretrained(model, source.path, is_trainable=True)
    logger.info("Training the SFT adapter of %s further; the reference is its frozen starting copy.", source.path)
    log_trainable_parameters(model)
    return model, path, False


def merged_sft_model(run_dir: Path) -> Path:
    """The SFT run's adapter merged into its base, once, in llmtune's cache (checked like `llmtune merge`)."""
    target = cache_entry("merged-sft", run_dir.name, run_dir / "adapter_model.safetensors")
    if not (target / "config.json").is_file():
        logger.info("Merging the SFT adapter of %s into its base once (cached in %s)", run_dir, target)
        merge_adapter(run_dir, target)
    return target


def drop_reference_adapter(model: Any) -> dict[str, Any]:
    """trl's frozen copy of a continued adapter ('ref') is not part of the result: save only the trained one."""
    if isinstance(model, PeftModel) and "ref" in model.peft_config:
        model.delete_adapter("ref")
    return {}


def reference_model(recipe: Recipe, attention: str) -> Any:
    """pref.reference: a model other than the starting one, frozen."""
    where = resolve_model(recipe.pref.reference, None, recipe.model.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(where.path, attn_implementation=attention, use_safetensors=True,
                                                 dtype=recipe.model.dtype)
    return model.eval().requires_grad_(False)
