"""Merge an adapter into a full-precision copy of its base, prove the merge is faithful, and save it.

A quantized base (QLoRA) is reloaded in float32 first: folding an adapter into 4-bit weights would round the
update away. Before anything is written, the merged model's logits are compared with adapter-on-base logits.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmtune.errors import LlmtuneError
from llmtune.inference.trained import load_trained
from llmtune.models.quantization import DTYPES
from llmtune.run.files import make_public, replace_folder

logger = logging.getLogger(__name__)

PROBE_TEXT = (
    "Fine-tuning adapts a pretrained language model to a task. The quick brown fox jumps over the lazy dog, "
    "and 12 + 30 = 42."
)


@dataclass
class MergeResult:
    out: Path
    base: str
    max_logit_difference: float


def merge_adapter(
    source: str | Path,
    out: str | Path,
    base: str | None = None,
    dtype: str = "float32",
    tolerance: float = 1e-4,
    overwrite: bool = False,
    into_run: bool = False,
) -> MergeResult:
    """Merge the adapter in `source` (a run, checkpoint or adapter folder) and save the full model in `out`.

    `out` must not hold files unless `overwrite`; `into_run` adds the merged files to a run directory.
    Nothing is written when the merged logits differ from adapter-on-base logits by more than `tolerance`
    times the largest logit (at least 1).
    """
    if dtype not in DTYPES:
        raise LlmtuneError(f"--dtype is {dtype!r}; choose one of {', '.join(DTYPES)}.")
    out = Path(out)
    if not into_run and out.exists() and any(out.iterdir()) and not overwrite:
        raise LlmtuneError(
            f"'{out}' already holds files; llmtune will not overwrite them. Choose another --out, or pass "
            "--overwrite to replace them."
        )
    adapter_dir = _adapter_folder(Path(source))
    model, tokenizer, _ = load_trained(adapter_dir, base=base, full_precision=True)
    base_path = model.peft_config["default"].base_model_name_or_path
    merged, difference = merge_verified(model, tokenizer, adapter_dir, tolerance, "nothing was saved")
    logger.info("Merged adapter into %s; logits match adapter-on-base within %.2e", base_path, difference)

    merged = merged.to(DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent if not into_run else out, prefix=".merging-"))
    try:
        merged.save_pretrained(staging)  # safetensors, and the run's generation config (stop tokens): load_trained
        tokenizer.save_pretrained(staging)
        make_public(staging)
        _publish(staging, out, into_run)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return MergeResult(out, base_path, difference)


def merge_verified(model: torch.nn.Module, tokenizer: Any, adapter_dir: Path, tolerance: float = 1e-4,
                   consequence: str = "nothing was written") -> tuple[torch.nn.Module, float]:
    """Fold a loaded adapter (on a full-precision base) into its base; (merged model, max logit difference).

    Raises when the merged logits differ from adapter-on-base logits on a probe by more than `tolerance` times
    the largest logit (at least 1).
    """
    probe = tokenizer(PROBE_TEXT, return_tensors="pt")
    with torch.no_grad():
        expected = model(**probe).logits
        merged = model.merge_and_unload()
        actual = merged(**probe).logits
    difference = (expected - actual).abs().max().item()
    allowed = allowed_difference(expected, tolerance)
    if difference > allowed:
        raise LlmtuneError(
            f"Merging the adapter in '{adapter_dir}' changed the model's outputs by up to {difference:.2e} "
            f"(allowed: {allowed:.1e}), so {consequence}. Use the adapter unmerged, or check that "
            "--base is the checkpoint it was trained on."
        )
    return merged, difference


def allowed_difference(logits: torch.Tensor, tolerance: float) -> float:
    """How far two float32 computations of `logits` may drift apart: float32 itself is only this exact -
    adapter-on-base logits of SmolLM2-135M (up to ~40) already differ from a float64 computation by ~7e-5 -
    so the bound scales with the size of the logits."""
    return tolerance * max(1.0, logits.abs().max().item())


def _adapter_folder(source: Path) -> Path:
    for folder in (source, source / "adapter"):
        if (folder / "adapter_config.json").is_file():
            return folder
    if not source.exists():
        raise LlmtuneError(f"'{source}' does not exist. Give a run directory, checkpoint or adapter folder.")
    raise LlmtuneError(
        f"'{source}' holds no adapter (no adapter_config.json): it is a full model already, or not a run. Only "
        "LoRA / DoRA runs need merging."
    )


def _publish(staging: Path, out: Path, into_run: bool) -> None:
    """Move the finished files into place; a crash before this point leaves `out` as it was."""
    if into_run:
        for item in staging.iterdir():
            os.replace(item, out / item.name)
        return
    replace_folder(staging, out)  # an existing `out` only when --overwrite was given
