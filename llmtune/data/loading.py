"""Load the recipe's train / eval / test splits from the Hub, a local dataset folder or local files.

Returns a DatasetDict with 'train' and, when configured, 'eval' and 'test'. Every failure names the recipe
key, the value and what would be valid.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from llmtune.config.schema import DataConfig
from llmtune.data.files import TEXT_SUFFIXES, check_utf8, unreadable
from llmtune.errors import LlmtuneError, did_you_mean
from llmtune.run.files import sha256

FILE_FORMATS = {
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".csv": ("csv", {}),
    # GLUE-style TSV files contain bare quote characters inside sentences: read them literally.
    ".tsv": ("csv", {"sep": "\t", "quoting": csv.QUOTE_NONE}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}


def load_splits(cfg: DataConfig, seed: int) -> DatasetDict:
    """The recipe's splits, with sample limits applied; 'train' first, then 'eval' and 'test' if set."""
    splits = _source_splits(cfg)
    if cfg.holdout_every:
        _hold_out_every(splits, cfg)
    if cfg.validation_fraction:
        _hold_out_fraction(splits, cfg, seed)
    if cfg.max_train_samples is not None:
        # A random subset, not the file's first rows. Without a limit the order stays that of the file, so
        # that errors can name rows by their place there (the Trainer shuffles every epoch anyway).
        splits["train"] = splits["train"].shuffle(seed=seed)
    limits = {"train": cfg.max_train_samples, "eval": cfg.max_eval_samples, "test": cfg.max_test_samples}
    for name, dataset in splits.items():
        if limits[name] is not None and len(dataset) > limits[name]:
            splits[name] = dataset.select(range(limits[name]))
        if len(splits[name]) == 0:
            raise LlmtuneError(
                f"The {name} split is empty ({describe_source(cfg, name)}). Point the recipe at data with rows, "
                "or check the max_*_samples and validation_fraction settings."
            )
    return DatasetDict(splits)


def _source_splits(cfg: DataConfig) -> dict[str, Dataset]:
    """The splits as the data source has them: a Hub / local dataset's named splits, or the data files."""
    if cfg.dataset:
        source = _load_dataset_source(cfg)
        named = {"train": cfg.train_split, "eval": cfg.eval_split, "test": cfg.test_split}
        splits = {split: _pick_split(source, name, f"data.{split}_split", cfg.dataset)
                  for split, name in named.items() if name}
    else:
        splits = {"train": load_file(cfg.train_file, "data.train_file")}
    for split, path in (("eval", cfg.eval_file), ("test", cfg.test_file)):
        if path:
            splits[split] = load_file(path, f"data.{split}_file")
    return splits


def _hold_out_every(splits: dict[str, Dataset], cfg: DataConfig) -> None:
    """data.holdout_every: every n-th training row becomes the eval split (a fixed, spread-out selection)."""
    rows, every = splits["train"], cfg.holdout_every
    if len(rows) < every:
        raise LlmtuneError(
            f"'data.holdout_every' is {every}, but the training data has only {len(rows)} rows "
            f"({describe_source(cfg, 'train')}), so nothing would be held out. Lower it or give more rows."
        )
    splits["eval"] = rows.select(range(every - 1, len(rows), every))
    splits["train"] = rows.select([i for i in range(len(rows)) if i % every != every - 1])


def _hold_out_fraction(splits: dict[str, Dataset], cfg: DataConfig, seed: int) -> None:
    """data.validation_fraction: a seeded random share of the training rows becomes the eval split."""
    rows = len(splits["train"])
    held_out = math.ceil(rows * cfg.validation_fraction)  # how datasets counts the eval rows
    if held_out < 1 or held_out >= rows:
        raise LlmtuneError(
            f"'data.validation_fraction' is {cfg.validation_fraction}, which holds out {held_out} of the "
            f"{rows} training rows ({describe_source(cfg, 'train')}): both parts need at least one row. "
            "Give more rows, change the fraction, or set data.eval_file instead."
        )
    parts = splits["train"].train_test_split(test_size=cfg.validation_fraction, seed=seed)
    splits["train"], splits["eval"] = parts["train"], parts["test"]


def load_file(path: str | None, key: str) -> Dataset:
    """One local data file as a Dataset; the format comes from the file's suffix."""
    file = Path(str(path))
    if not file.is_file():
        raise LlmtuneError(
            f"'{key}' is '{path}', but that file does not exist. Relative paths in a recipe file are taken from "
            "the recipe's folder, on the command line from the current folder."
        )
    suffix = file.suffix.lower()
    if suffix == ".gz":  # datasets reads gzip-compressed files as they are; the format is the inner suffix
        suffix = Path(file.stem).suffix.lower()
    if suffix not in FILE_FORMATS:
        raise LlmtuneError(
            f"'{key}' is '{path}': llmtune cannot tell its format from '{suffix}'. "
            f"Use one of {', '.join(FILE_FORMATS)} (each may be gzip-compressed, e.g. .jsonl.gz)."
        )
    builder, options = FILE_FORMATS[suffix]
    if suffix in TEXT_SUFFIXES:
        check_utf8(file, key)  # pyarrow's JSON reader takes invalid UTF-8 in and fails later, on first access
    try:
        with quiet_logger("datasets"):  # a failure is explained below, with the row; the library's own log is noise
            return load_dataset(builder, data_files=str(file), split="train", **options)
    except Exception as exc:  # datasets raises many types for unreadable files
        if "corresponds to no data" in str(exc) or file.stat().st_size == 0:
            raise LlmtuneError(
                f"'{key}' is '{path}', which holds no data rows (the split would be empty). "
                "Point it at a file with rows, or leave the key empty."
            ) from None
        raise unreadable(file, key, exc) from None


def load_image_rows(path: str, key: str) -> Dataset:
    """Labelled images for `llmtune eval`: a folder (IDX files, or a subfolder per class) or a data file."""
    from llmtune.data.images import image_folder_source

    folder = Path(path)
    if not folder.is_dir():
        return load_file(path, key)
    found = image_folder_source(folder)
    if found is None:
        raise LlmtuneError(f"'{key}' is '{path}', a folder with no images in it (nor IDX files).")
    if isinstance(found, DatasetDict):
        if len(found) != 1:
            raise LlmtuneError(f"'{key}' is '{path}', which holds the splits {', '.join(found)}; point it at one of "
                               "their subfolders.")
        found = next(iter(found.values()))
    return found


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Keep a library's logger to CRITICAL messages for the duration."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def require_columns(dataset: Dataset, split: str, wanted: dict[str, str | None]) -> None:
    """Check that each configured column (recipe key -> column name) exists in the split."""
    for key, column in wanted.items():
        if column is not None and column not in dataset.column_names:
            raise LlmtuneError(
                f"'{key}' is '{column}', but the {split} data has no such column."
                f"{did_you_mean(column, dataset.column_names)} Its columns are: {', '.join(dataset.column_names)}."
            )


def fingerprint_sources(cfg: DataConfig) -> dict[str, Any]:
    """What the run was trained on: a sha256 per local file, or the Hub id, subset and splits."""
    record: dict[str, Any] = {}
    for key in ("train_file", "eval_file", "test_file"):
        path = getattr(cfg, key)
        if path:
            record[key] = {"path": str(Path(path).resolve()), "sha256": sha256(Path(path))}
    if cfg.dataset:
        record["dataset"] = {"id": cfg.dataset, "subset": cfg.subset}
        for key in ("train_split", "eval_split", "test_split"):
            record["dataset"][key] = getattr(cfg, key)
    return record


def _load_dataset_source(cfg: DataConfig) -> DatasetDict | Dataset:
    folder = Path(cfg.dataset)
    if folder.is_dir() and ((folder / "dataset_dict.json").exists() or (folder / "state.json").exists()):
        return load_from_disk(str(folder))
    if folder.is_dir():
        from llmtune.data.images import image_folder_source

        images = image_folder_source(folder)  # IDX files, or one subfolder of images per class
        if images is not None:
            return images
    try:
        return load_dataset(cfg.dataset, cfg.subset)
    except Exception as exc:  # offline, unknown id, missing subset, ...
        raise LlmtuneError(
            f"'data.dataset' is '{cfg.dataset}'" + (f" (subset '{cfg.subset}')" if cfg.subset else "")
            + f", which could not be loaded: {exc}. Without network, point 'data.train_file' (and eval_file) "
            "at local files instead and set data.dataset=null."
        ) from None


def _pick_split(source: DatasetDict | Dataset, split: str, key: str, dataset: str) -> Dataset:
    if isinstance(source, Dataset):
        return source
    if split not in source:
        raise LlmtuneError(
            f"'{key}' is '{split}', but dataset '{dataset}' has no such split.{did_you_mean(split, source)} "
            f"Its splits are: {', '.join(source)}."
        )
    return source[split]


def describe_source(cfg: DataConfig, split: str) -> str:
    """Where a split comes from, for messages: "file '...'", "dataset '...'" or "carved from the training data"."""
    file = getattr(cfg, f"{split}_file", None)
    if file:
        return f"file '{file}'"
    if cfg.dataset:
        return f"dataset '{cfg.dataset}'"
    return "carved from the training data"
