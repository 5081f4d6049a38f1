"""The final tokenized training data of a causal-LM recipe, kept between runs.

A second run of the same recipe on the same data should start training at once. datasets' own cache already
skips the tokenization, but finding its entries still walks the raw rows (the conversion to conversations) and
hashes the tokenizer: about 0.3 s for Alpaca 5k, every run. Here the finished splits are saved once with
`save_to_disk` and reopened memory-mapped, with no per-row Python work, under a key computed from files alone:

- the content (sha256) of every data file the recipe reads;
- the content of the checkpoint's tokenizer files (every small non-weight file of its folder);
- every data and loss setting of the recipe (data section, lm.loss_on, lm.chat_template, task, seed);
- the content of a `.jinja` chat template file the recipe names;
- the source of the modules that read and tokenize, and the versions of datasets, tokenizers and transformers.

Anything that could change a token changes the key, so a stale entry is never read. Recipes whose inputs cannot be
hashed from local files - a Hub dataset or Hub checkpoint, a tokenizer trained from scratch - skip this cache and
rely on datasets' own.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from llmtune.data.fingerprint import source_fingerprint
from llmtune.data.lm_tokenize import repeat_drop_warnings
from llmtune.run.files import sha256

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack", ".onnx")
SMALL_FILE = 64 << 20  # tokenizer files are at most tens of MB; anything bigger is not one
PACKAGE = Path(__file__).resolve().parents[1]
# The code that decides what the tokenized splits hold: the load -> tokenize path and every data / models module it
# imports, found by reading their imports (a new helper module is covered without a list to keep up to date).
CODE_ROOTS = ("llmtune.tasks.causal_lm", "llmtune.data.lm_data", "llmtune.models.tokenizers", __name__)
CODE_ROOMS = ("data", "models")


def code_files() -> list[Path]:
    """The source files of CODE_ROOTS and of the data / models modules they import, directly or not."""
    found: dict[str, Path] = {}
    todo = list(CODE_ROOTS)
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in found or path is None:
            continue
        found[name] = path
        for imported in _llmtune_imports(path):
            if imported.split(".")[1] in CODE_ROOMS:
                todo.append(imported)
    return sorted(found.values())


def _module_file(name: str) -> Path | None:
    relative = Path(*name.split(".")[1:])
    for candidate in (PACKAGE / relative.with_suffix(".py"), PACKAGE / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _llmtune_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmtune."):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from llmtune.data import x`
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("llmtune."))
    return names


@dataclass
class Tokenized:
    splits: dict[str, Dataset]  # loss-masked conversations or text blocks per split
    stats: dict[str, Any]  # token statistics per split
    fmt: str  # the resolved data format
    loss_on: str  # "assistant" or "all"

    @property
    def chat(self) -> bool:
        return self.fmt != "text"


def cache_key(recipe: Any, model_path: str | None) -> str | None:
    """The entry's name, or None when an input is not a local file (see the module docstring); also None for a
    missing file, so that the loader reports it as usual."""
    data, template = recipe.data, recipe.lm.chat_template
    if recipe.model.init == "scratch" or data.dataset or model_path is None or not Path(model_path).is_dir():
        return None
    if any(source.get("dataset") for source in data.mixture):
        return None
    files = [Path(f) for f in (data.train_file, data.eval_file, *(s.get("train_file") for s in data.mixture)) if f]
    if template and template.endswith(".jinja"):
        files.append(Path(template))
    if not all(f.is_file() for f in files):
        return None
    inputs = {
        "files": {str(f): sha256(f) for f in files},
        "tokenizer_files": _tokenizer_files_hash(Path(model_path)),
        "settings": [dataclasses.asdict(data), recipe.lm.loss_on, template, recipe.task, recipe.training.seed],
        "code": [source_fingerprint(str(path)) for path in code_files()],
        "versions": [importlib.metadata.version(p) for p in ("datasets", "tokenizers", "transformers")],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load(folder: Path, key: str) -> Tokenized | None:
    """The cached splits (memory-mapped), or None when there is no complete entry."""
    entry = folder / key
    meta = entry / "meta.json"
    if not meta.is_file():
        return None
    record = json.loads(meta.read_text())
    splits = {name: Dataset.load_from_disk(str(entry / name)) for name in record["splits"]}
    logger.info("Tokenized data reused from %s (the same data, tokenizer and settings as before)", entry)
    for split, stats in record["stats"].items():
        repeat_drop_warnings(split, stats)
    return Tokenized(splits, record["stats"], record["fmt"], record["loss_on"])


def save(folder: Path, key: str, tokenized: Tokenized) -> None:
    """Write the entry to a staging folder and move it into place: a crash never leaves a half-written entry, and
    a second process writing the same entry at once is harmless. A cache that cannot be written (full disk,
    read-only folder) costs the next run its shortcut, not this run: a warning, and training goes on."""
    try:
        _write(folder, key, tokenized)
    except OSError as error:
        logger.warning("Could not cache the tokenized data in %s (%s); the next run tokenizes again.", folder, error)


def _write(folder: Path, key: str, tokenized: Tokenized) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".writing-"))
    try:
        for name, rows in tokenized.splits.items():
            rows.save_to_disk(str(staging / name))
        record = {"splits": list(tokenized.splits), "stats": tokenized.stats, "fmt": tokenized.fmt,
                  "loss_on": tokenized.loss_on}
        (staging / "meta.json").write_text(json.dumps(record))
        try:
            os.replace(staging, folder / key)
        except OSError:
            if not (folder / key / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tokenizer_files_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES and path.stat().st_size < SMALL_FILE:
            digest.update(path.name.encode())
            digest.update(sha256(path).encode())
    return digest.hexdigest()
