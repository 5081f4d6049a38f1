"""Save what a run trained, and load it back - a full model or an adapter on its base - for prediction,
evaluation, generation, merging and publishing."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from llmtune.errors import LlmtuneError
from llmtune.models.adapters import is_adapter
from llmtune.models.sources import resolve_model
from llmtune.runs import RUN_RECORD, read_json

logger = logging.getLogger(__name__)

ADAPTER_SUBDIR = "adapter"  # where a run saved as 'merged' keeps its adapter
AUTO_CLASSES = {"CAUSAL_LM": AutoModelForCausalLM, "SEQ_CLS": AutoModelForSequenceClassification}


def save_trained(trainer: Any, run_dir: Path, save: str, base_path: str | None) -> None:
    """Leave the adapter, merged or full model at the top of the run dir, with tokenizer and configs.

    'merged' keeps the adapter in adapter/ and merges it into a full-precision copy of the base. Called on
    every process; only the main one writes.
    """
    if save == "auto":
        save = "adapter" if is_adapter(trainer.model) else "full"
    target = run_dir / ADAPTER_SUBDIR if save == "merged" else run_dir
    if trainer.is_fsdp_enabled:
        # Gather the shards into one whole state dict for the final save (checkpoints may stay sharded).
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(target))  # every process takes part (ZeRO-3 / FSDP gather); the main one writes
    if not trainer.is_world_process_zero():
        return
    if is_adapter(trainer.model):
        inner = trainer.model.base_model.model
        # The model config carries what loaders need beside the adapter: labels, vocabulary size after
        # added chat tokens; the generation config carries the end-of-turn stop token.
        inner.config.save_pretrained(target)
        if inner.can_generate():
            inner.generation_config.save_pretrained(target)
    if save == "merged":
        from llmtune.models.merge import merge_adapter

        merge_adapter(target, run_dir, base=base_path, into_run=True)
    logger.info("Saved the %s to %s", "adapter" if save == "adapter" else f"{save} model", run_dir)


def load_trained(
    path: str | Path, auto_class: Any = None, base: str | None = None, full_precision: bool = False
) -> tuple[torch.nn.Module, Any, dict | None]:
    """(model in eval mode, tokenizer, run.json recipe or None) from a run, a checkpoint-N folder, an adapter
    folder or a model name (Hub id, .gguf file, installed short name).

    An adapter is put on its base: `base` if given, else the one the run trained on. `full_precision` loads
    that base in float32 even when training quantized it (for merging). `auto_class` defaults to the
    adapter's task type.
    """
    folder = Path(path)
    if not folder.is_dir():
        folder = Path(resolve_model(str(path)).path)
    run_dir = next((d for d in (folder, folder.parent) if (d / RUN_RECORD).exists()), None)
    record = read_json(run_dir / RUN_RECORD) if run_dir else {}
    config_dir = next((d for d in (folder, run_dir) if d and (d / "config.json").exists()), None)
    if config_dir is None:
        raise LlmtuneError(f"'{path}' holds no config.json: it is not a saved llmtune run or model.")
    config = AutoConfig.from_pretrained(config_dir)
    if (folder / "adapter_config.json").exists():
        adapter = json.loads((folder / "adapter_config.json").read_text())
        auto_class = auto_class or AUTO_CLASSES.get(adapter.get("task_type"), AutoModelForCausalLM)
        base_path = find_base(folder, adapter, record, base)
        loading: dict[str, Any] = {"dtype": torch.float32}
        quantization = getattr(config, "quantization_config", None)
        if quantization:
            # The saved config records how training quantized the base; from_pretrained needs that as a
            # BitsAndBytesConfig of its own, not inside the config, to quantize the weights it loads.
            del config.quantization_config
            if not full_precision:
                from transformers import BitsAndBytesConfig

                loading["quantization_config"] = BitsAndBytesConfig.from_dict(dict(quantization))
        base_model = auto_class.from_pretrained(base_path, config=config, use_safetensors=True, **loading)
        model = PeftModel.from_pretrained(base_model, folder)
    else:
        model = (auto_class or AutoModelForCausalLM).from_pretrained(folder, use_safetensors=True)
    tokenizer_dir = folder if (folder / "tokenizer_config.json").exists() else run_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return model.eval(), tokenizer, record.get("recipe")


def find_base(adapter_dir: Path, adapter: dict, record: dict, base: str | None) -> str:
    """The adapter's base checkpoint: `base`, else where the run loaded it, else the recipe's or the adapter
    config's model name resolved again (a Hub id or installed name works on another machine)."""
    if base:
        return resolve_model(base).path
    tried = []
    for candidate in (record.get("model_path"), adapter.get("base_model_name_or_path"),
                      (record.get("recipe") or {}).get("model", {}).get("name")):
        if not candidate or candidate in tried:
            continue
        tried.append(candidate)
        if Path(candidate).is_dir():
            return candidate
        try:
            return resolve_model(candidate).path
        except LlmtuneError:
            continue
    raise LlmtuneError(
        f"The base model of the adapter in '{adapter_dir}' cannot be found (tried: {', '.join(tried) or 'nothing'}). "
        "Point at it with --base PATH_OR_HUB_ID (the checkpoint the adapter was trained on)."
    )
