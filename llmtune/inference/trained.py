"""Save what a run trained, and load it back - a full model or an adapter on its base - for prediction,
evaluation, generation, merging and publishing."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)

from llmtune.config.vocab import CAUSAL_LM_TASKS
from llmtune.errors import LlmtuneError
from llmtune.models.adapters import is_adapter
from llmtune.models.sources import resolve_model
from llmtune.patches.bnb_cpu_repacking import keep_4bit_weights_in_training_layout
from llmtune.patches.fsdp_full_state_dict import gather_full_state_dict_for_saving
from llmtune.run.files import make_public, read_json, write_json
from llmtune.run.run_dir import RUN_RECORD

logger = logging.getLogger(__name__)

ADAPTER_SUBDIR = "adapter"  # where a run saved as 'merged' keeps its adapter
AUTO_CLASSES = {"CAUSAL_LM": AutoModelForCausalLM, "SEQ_CLS": AutoModelForSequenceClassification}


def save_trained(trainer: Any, target: Path, hub_base: str | None = None, revision: str | None = None) -> None:
    """Save the adapter (with the model and generation configs loaders need) or the full model in `target`.

    Called on every process (ZeRO-3 / FSDP gather the weights together); only the main one writes. An adapter's
    config names its base by Hub id when there is one (`hub_base`), not by this machine's cache path.
    """
    gather_full_state_dict_for_saving(trainer)  # FSDP: one whole state dict for the final save
    trainer.save_model(str(target))
    if not trainer.is_world_process_zero():
        return
    if is_adapter(trainer.model):
        inner = trainer.model.base_model.model
        # The model config carries what loaders need beside the adapter: labels, vocabulary size after
        # added chat tokens; the generation config carries the end-of-turn stop token.
        inner.config.save_pretrained(target)
        if inner.can_generate():
            inner.generation_config.save_pretrained(target)
        if hub_base:
            name_base_in_adapter_config(target, hub_base, revision)
    make_public(target)


def name_base_in_adapter_config(folder: Path, base: str, revision: str | None = None) -> None:
    """Point an adapter's config at its base by name (a Hub id, and the revision trained on) instead of the folder
    it was loaded from, so that plain peft finds it on any machine."""
    path = folder / "adapter_config.json"
    if path.is_file():
        config = {**json.loads(path.read_text()), "base_model_name_or_path": base}
        if revision:
            config["revision"] = revision
        write_json(path, config)


def load_trained(
    path: str | Path, auto_class: Any = None, base: str | None = None, full_precision: bool = False
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer or None, run.json record or {}) from a run, a checkpoint-N folder, an adapter folder
    or a model name (Hub id, .gguf file, installed short name).

    An adapter is put on its base: `base` if given, else the one the run trained on. `full_precision` loads
    that base in float32 even when training quantized it (for merging). `auto_class` defaults to the
    adapter's task type.
    """
    folder = Path(path)
    if not folder.is_dir():
        folder = Path(resolve_model(str(path)).path)
    run_dir = find_run_dir(folder)
    record = read_json(run_dir / RUN_RECORD) if run_dir else {}
    config_dir = next((d for d in (folder, run_dir) if d and (d / "config.json").exists()), None)
    if config_dir is None:
        raise LlmtuneError(f"'{path}' holds no config.json: it is not a saved llmtune run or model.")
    config = AutoConfig.from_pretrained(config_dir)
    if (folder / "adapter_config.json").exists():
        adapter = json.loads((folder / "adapter_config.json").read_text())
        images = (record.get("recipe") or {}).get("task") == "image_classification"  # peft has no image task type
        auto_class = auto_class or AUTO_CLASSES.get(adapter.get("task_type"), AutoModelForImageClassification if images
                                                    else AutoModelForCausalLM)
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
        if auto_class is AutoModelForImageClassification:  # the base's own head (other labels) gives way to the run's
            loading["ignore_mismatched_sizes"] = True
        base_model = auto_class.from_pretrained(base_path, config=config, use_safetensors=True, **loading)
        if "quantization_config" in loading:
            keep_4bit_weights_in_training_layout(base_model)  # score as training did (patches/bnb_cpu_repacking.py)
        if base_model.can_generate() and (folder / "generation_config.json").is_file():
            # The run's stop tokens (an end-of-turn token added with its chat template), not the base's.
            base_model.generation_config = GenerationConfig.from_pretrained(folder)
        model = PeftModel.from_pretrained(base_model, folder)
    else:
        model = (auto_class or AutoModelForCausalLM).from_pretrained(folder, use_safetensors=True)
    tokenizer_dir = next((d for d in (folder, run_dir) if d and (d / "tokenizer_config.json").exists()), None)
    # Image classifiers have no tokenizer: their config carries the pixel format (data/images.PixelSpec).
    if tokenizer_dir is None and hasattr(config, "image_mean"):
        return model.eval(), None, record
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or folder)
    return model.eval(), tokenizer, record


def find_run_dir(folder: Path) -> Path | None:
    """The run directory a folder belongs to: itself, or the run holding this checkpoint-N / adapter folder."""
    return next((d for d in (folder, folder.parent) if (d / RUN_RECORD).exists()), None)


def model_kind(path: str | Path) -> str | None:
    """'classification' or 'causal_lm' for a run, checkpoint or model folder - read from run.json or config.json,
    without loading weights; None when it cannot be told (e.g. a Hub id)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    return _kind_from_run_record(folder) or _kind_from_model_files(folder)


def _kind_from_run_record(folder: Path) -> str | None:
    run_dir = find_run_dir(folder)
    if run_dir is None:
        return None
    try:
        task = read_json(run_dir / RUN_RECORD).get("recipe", {}).get("task")
    except (OSError, ValueError, AttributeError):
        return None  # a damaged run.json: tell by the model's own config
    if not task:
        return None
    return "causal_lm" if task in CAUSAL_LM_TASKS else "classification" if task == "distill" else task


def _kind_from_model_files(folder: Path) -> str | None:
    for candidate in (folder, folder / ADAPTER_SUBDIR):
        if (candidate / "adapter_config.json").is_file():
            task_type = _json_field(candidate / "adapter_config.json", "task_type")
            return {"SEQ_CLS": "classification", "CAUSAL_LM": "causal_lm"}.get(task_type)
    architectures = _json_field(folder / "config.json", "architectures") or []
    endings = {"ForSequenceClassification": "classification", "ForImageClassification": "image_classification",
               "ForCausalLM": "causal_lm", "LMHeadModel": "causal_lm"}
    for ending, kind in endings.items():  # heads first: a checkpoint may list more than one architecture
        if any(a.endswith(ending) for a in architectures):
            return kind
    return None


def _json_field(path: Path, key: str) -> Any:
    """A field of a JSON file, or None when the file is missing or damaged (the loader then names the problem)."""
    try:
        return json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


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
