"""`llmtune export`: a trained run as files for the runtimes people deploy with - GGUF for llama.cpp, the same
plus an Ollama Modelfile, or ONNX for onnxruntime (classifiers).

Every file is written under a temporary name, read back and compared with the run's own model, and only then
moved into place: a file that fails the check is deleted, an existing export is replaced only with `overwrite`,
and the run's run.json lists what was exported with the check's numbers (the model card shows them).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmtune.errors import LlmtuneError
from llmtune.run.files import (
    file_mode,
    make_public,
    read_json,
    replace_folder,
    sha256,
    why_unwritable,
    write_json,
    write_text,
)
from llmtune.run.run_dir import RUN_RECORD

logger = logging.getLogger(__name__)

FORMAT_KIND = {"gguf": "causal_lm", "ollama": "causal_lm", "onnx": "classification"}  # what each exports
PROBE_QUESTION = "What does fine-tuning change in a language model? Answer in one sentence, then add 12 + 30."
PROBE_REPLY = "Fine-tuning adapts a pretrained model's weights to a task; 12 + 30 = 42."
# Greedy replies to these are compared between the run's model and the exported file (the README's prompts).
REPLY_PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?"]
# Sentences of different lengths and moods: the ONNX check pads them into batches like real traffic.
PROBE_SENTENCES = [
    "a gripping, beautiful film", "dull.", "I wanted to like it, but the plot falls apart halfway through.",
    "not bad at all", "The performances are superb and the score is unforgettable, even if the ending drags.",
    "worst two hours of my year", "an honest, funny and surprisingly moving story about growing up", "meh",
    "It is neither as clever nor as charming as it thinks it is.", "Five stars!",
    "The director's steady hand turns a thin script into something worth seeing on the big screen.", "why?",
]


@dataclass
class Exported:
    name: str  # what the files are called after (the run, plus the checkpoint when one was exported)
    files: list[Path]  # files written (for ONNX, the folder)
    checks: dict[str, Any] = field(default_factory=dict)


def export(run: str | Path, fmt: str, quant: str | None = None, out: str | Path | None = None,
           overwrite: bool = False) -> Exported:
    """Export a run (or checkpoint / model folder) as `fmt` into `out` (default: the run's export/ folder)."""
    from llmtune.inference.trained import find_run_dir, model_kind

    source = Path(run).resolve()
    if fmt not in FORMAT_KIND:
        raise LlmtuneError(f"--format is {fmt!r}; choose one of {', '.join(FORMAT_KIND)}.")
    if not source.is_dir():
        raise LlmtuneError(f"'{run}' is not a folder. Give a run directory, one of its checkpoint-N folders, or "
                           "a saved model folder.")
    kind = model_kind(source)
    if kind is not None and kind != FORMAT_KIND[fmt]:
        fits = [name for name, wanted in FORMAT_KIND.items() if wanted == kind]
        if not fits:
            raise LlmtuneError(f"'{run}' is a {kind} model; llmtune export writes causal LMs (gguf, ollama) and "
                               "classifiers (onnx) only.")
        raise LlmtuneError(f"--format {fmt} exports {FORMAT_KIND[fmt].replace('_', ' ')} models; '{run}' is a "
                           f"{kind.replace('_', ' ')} model. Use --format {' or '.join(fits)}.")
    run_dir = find_run_dir(source)
    out_dir = Path(out) if out else (run_dir or source) / "export"
    check_output_folder(out_dir, "--out" if out else "--out (default RUN/export)")
    # A checkpoint's export is named apart from the final model's, so neither replaces the other.
    name = source.name if run_dir in (None, source) else f"{run_dir.name}-{source.name}"
    if fmt == "onnx":
        if quant:
            raise LlmtuneError("--quant applies to GGUF exports; ONNX classifiers are exported in float32.")
        result = _export_onnx(source, out_dir / f"{name}-onnx", name, overwrite)
    else:
        quant = quant or "f16"
        result = _export_gguf(source, out_dir, name, quant, fmt == "ollama", overwrite)
    if run_dir is not None:
        _record(run_dir, source, fmt, quant, result)
    return result


def check_output_folder(path: str | Path, option: str = "--out") -> None:
    """Refuse, before any model loads, an output folder that cannot be created or written."""
    problem = why_unwritable(Path(path))
    if problem:
        raise LlmtuneError(f"{option} is '{path}', but {problem}. Give {option} a folder you can write to (it is "
                           "created if missing), e.g. --out ./exports.")


def _export_gguf(source: Path, out_dir: Path, name: str, quant: str, ollama: bool, overwrite: bool) -> Exported:
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmtune.inference.generation import stop_token_ids
    from llmtune.inference.merge import merge_verified
    from llmtune.inference.trained import load_trained
    from llmtune.models.adapters import is_adapter
    from llmtune.ship.gguf_file import QUANTS, check_exportable, check_tokenizer, verify_gguf, write_gguf
    from llmtune.ship.ollama import modelfile

    if quant not in QUANTS:
        raise LlmtuneError(f"--quant is {quant!r}; choose one of {', '.join(QUANTS)}.")
    target = out_dir / f"{name}-{quant}.gguf"
    modelfile_path = out_dir / f"{name}-{quant}.Modelfile"
    _refuse_existing([target, modelfile_path] if ollama else [target], overwrite)
    config_dir = next((d for d in (source, source.parent) if (d / "config.json").is_file()), None)
    if config_dir is not None:  # without one, load_trained below says what is missing
        check_exportable(AutoConfig.from_pretrained(config_dir))
    model, tokenizer, _ = load_trained(source, AutoModelForCausalLM, full_precision=True)
    check_tokenizer(tokenizer)
    if is_adapter(model):
        logger.info("Merging the adapter into a float32 copy of its base")
        model, _ = merge_verified(model, tokenizer, source, consequence="nothing was exported")
    model = model.float().eval()
    stop_ids = stop_token_ids(model)
    # Translate the template before writing anything: a template Ollama cannot take leaves no files behind.
    modelfile_text = modelfile(tokenizer, target.name, [tokenizer.decode([i]) for i in sorted(stop_ids)]) \
        if ollama else None

    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".partial-{os.getpid()}-{target.name}"
    try:
        logger.info("Writing %s (%s)", target, quant)
        write_gguf(model, tokenizer, partial, quant, name, stop_ids)
        logger.info("Reading it back with transformers to check it against the run's model")
        checks = verify_gguf(partial, model, tokenizer, quant, _probe_text(tokenizer), REPLY_PROMPTS)
        os.chmod(partial, file_mode())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    files = [target]
    if modelfile_text is not None:
        write_text(modelfile_path, modelfile_text)
        files.append(modelfile_path)
    return Exported(name, files, checks)


def _export_onnx(source: Path, folder: Path, name: str, overwrite: bool) -> Exported:
    from llmtune.inference.classifier import Classifier
    from llmtune.inference.merge import merge_verified
    from llmtune.inference.onnx_classifier import SETTINGS_FILE
    from llmtune.models.adapters import is_adapter
    from llmtune.ship.onnx_file import verify_onnx, write_onnx

    _refuse_existing([folder], overwrite)
    if folder.exists() and not (folder / SETTINGS_FILE).is_file():
        raise LlmtuneError(f"'{folder}' exists but is not an ONNX export llmtune wrote (it has no {SETTINGS_FILE}); "
                           "llmtune will not replace it even with --overwrite. Move it, or pass --out DIR.")
    classifier = Classifier.load(source, precision="fp32", full_precision=True)
    if is_adapter(classifier.model):
        classifier.model, _ = merge_verified(classifier.model, classifier.tokenizer, source,
                                             consequence="nothing was exported")
    classifier.model = classifier.model.float().eval()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".partial-{folder.name}-"))
    try:
        logger.info("Exporting %s to ONNX", source)
        write_onnx(classifier, staging)
        pairs = list(reversed(PROBE_SENTENCES)) if classifier.columns.get("text_pair") else None
        logger.info("Checking onnxruntime's probabilities against PyTorch's")
        checks = verify_onnx(staging, classifier, PROBE_SENTENCES, pairs)
        make_public(staging)
        replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Exported(name, [folder], checks)


def _probe_text(tokenizer: Any) -> str:
    if not tokenizer.chat_template:
        return f"{PROBE_QUESTION} {PROBE_REPLY}"
    conversation = [{"role": "user", "content": PROBE_QUESTION}, {"role": "assistant", "content": PROBE_REPLY}]
    return tokenizer.apply_chat_template(conversation, tokenize=False)


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise LlmtuneError(f"{', '.join(existing)} already exist(s); llmtune will not overwrite an export. Pass "
                           "--overwrite to replace it, or --out DIR to write somewhere else.")


def _record(run_dir: Path, source: Path, fmt: str, quant: str | None, result: Exported) -> None:
    """Add the export to run.json (without touching what training recorded there)."""
    path = run_dir / RUN_RECORD
    record = read_json(path)
    entries = []
    for file in result.files:
        entry: dict[str, Any] = {"path": _relative(file, run_dir)}
        if file.is_file():
            entry["bytes"] = file.stat().st_size
            entry["sha256"] = sha256(file)
        entries.append(entry)
    paths = {entry["path"] for entry in entries}  # an export written again replaces its old entry
    exports = [e for e in record.get("exports", []) if not paths & {f["path"] for f in e.get("files", [])}]
    exports.append({
        "format": fmt, "quant": quant, "source": _relative(source, run_dir), "files": entries,
        "checks": result.checks, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
    })
    write_json(path, {**record, "exports": exports})


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())
