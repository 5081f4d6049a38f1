"""Load what a run saved - a full model or an adapter on its base - for prediction, evaluation or generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoConfig, AutoTokenizer

from llmtune.errors import LlmtuneError
from llmtune.models.sources import resolve_model
from llmtune.runs import RUN_RECORD, read_json


def load_trained(path: str | Path, auto_class: Any) -> tuple[torch.nn.Module, Any, dict | None]:
    """(model in eval mode, tokenizer, run.json recipe or None) from a run, a checkpoint-N folder or a model name.

    A path that is not a folder is resolved like `model.name` (Hub id, .gguf file, installed short name).
    """
    folder = Path(path)
    if not folder.is_dir():
        folder = Path(resolve_model(str(path)).path)
    run_dir = folder if (folder / RUN_RECORD).exists() else folder.parent
    recipe = read_json(run_dir / RUN_RECORD)["recipe"] if (run_dir / RUN_RECORD).exists() else None
    config_dir = folder if (folder / "config.json").exists() else run_dir
    if not (config_dir / "config.json").exists():
        raise LlmtuneError(f"'{path}' holds no config.json: it is not a saved llmtune run or model.")
    config = AutoConfig.from_pretrained(config_dir)
    if (folder / "adapter_config.json").exists():
        # The base is loaded with the run's config (label names, vocabulary size), then the adapter on top.
        base_path = PeftConfig.from_pretrained(folder).base_model_name_or_path
        base = auto_class.from_pretrained(base_path, config=config, use_safetensors=True)
        model = PeftModel.from_pretrained(base, folder)
    else:
        model = auto_class.from_pretrained(folder, use_safetensors=True)
    tokenizer_dir = folder if (folder / "tokenizer_config.json").exists() else run_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return model.eval(), tokenizer, recipe
