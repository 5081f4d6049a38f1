"""Images for image classification: where they come from, and how they become the tensors a model sees.

Sources (besides the data files and datasets `load_splits` reads): a folder of MNIST-style IDX files, and a
folder with one subfolder of images per class (datasets' imagefolder). Every image - a decoded image, a file
path, bytes or a pixel array - is decoded, converted to the model's channels and resized once, in a cached
`map`; unreadable files are skipped and counted. Augmentation (random shift / rotation, PIL) and normalisation
happen when a batch is drawn, so every epoch sees new shifts.
"""

from __future__ import annotations

import gzip
import io
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_dataset
from datasets import Image as ImageFeature
from PIL import Image, UnidentifiedImageError

from llmtune.config.task_sections import ImageConfig
from llmtune.errors import LlmtuneError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IDX_IMAGES, IDX_LABELS = "images-idx3-ubyte", "labels-idx1-ubyte"


# --- sources ------------------------------------------------------------------------------------------------


def image_folder_source(folder: Path) -> Dataset | DatasetDict | None:
    """A folder of IDX files or of class subfolders as a dataset; None when the folder holds neither."""
    images = sorted(folder.glob(f"*{IDX_IMAGES}*"))
    if images:
        labels = sorted(folder.glob(f"*{IDX_LABELS}*"))
        if len(images) != 1 or len(labels) != 1:
            raise LlmtuneError(
                f"'data.dataset' is '{folder}', which holds {len(images)} IDX image file(s) and {len(labels)} label "
                "file(s); llmtune reads a folder with exactly one of each (e.g. t10k-images-idx3-ubyte.gz and "
                "t10k-labels-idx1-ubyte.gz)."
            )
        return read_idx(images[0], labels[0])
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file()):
        return None
    classes = [d.name for d in folder.iterdir() if d.is_dir()]
    if len(classes) < 2 and not {"train", "test", "validation"} & set(classes):
        raise LlmtuneError(
            f"'data.dataset' is '{folder}', an image folder with {len(classes)} class subfolder(s) "
            f"({', '.join(classes) or 'none'}). Put each class's images in a subfolder named after the class "
            "(cat/1.png, dog/2.png, ...): classification needs at least two."
        )
    return load_dataset("imagefolder", data_dir=str(folder))


def read_idx(images: Path, labels: Path) -> Dataset:
    """MNIST's IDX format: a header of dimensions, then raw uint8 pixels (and labels), optionally gzipped."""
    pixels, targets = _idx_array(images), _idx_array(labels)
    if pixels.ndim != 3 or targets.ndim != 1 or len(pixels) != len(targets):
        raise LlmtuneError(
            f"'{images.name}' holds an array of shape {pixels.shape} and '{labels.name}' one of shape {targets.shape}; "
            "llmtune reads N images of H x W pixels and N labels."
        )
    return Dataset.from_dict({"image": pixels, "label": targets.astype(np.int64)})


def _idx_array(path: Path) -> np.ndarray:
    raw = (gzip.decompress if path.suffix == ".gz" else bytes)(path.read_bytes())
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] != 8:  # magic: two zero bytes, 0x08 = unsigned byte data
        raise LlmtuneError(f"'{path}' is not an IDX file of unsigned bytes (its first bytes are {raw[:4]!r}).")
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


# --- decoding, once -------------------------------------------------------------------------------------------


def decode(value: Any, base_dir: Path | None = None) -> Image.Image:
    """A PIL image from a decoded image, a {'bytes', 'path'} dict (datasets' Image), a path, bytes or pixels."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return Image.open(path)
    return Image.fromarray(np.asarray(value, dtype=np.uint8))


@dataclass
class PixelSpec:
    """What the model sees: size x size pixels, 1 or 3 channels, normalised with mean / std (pixels in [0, 1])."""

    size: int
    channels: int
    mean: list[float]
    std: list[float]

    def save_to(self, config: Any) -> None:
        """Keep the spec in the model's config, so a saved model carries its own preprocessing."""
        config.image_size, config.num_channels = self.size, self.channels
        config.image_mean, config.image_std = self.mean, self.std

    @classmethod
    def from_config(cls, config: Any) -> PixelSpec:
        size = config.image_size
        return cls(size if isinstance(size, int) else size[0], config.num_channels, list(config.image_mean),
                   list(config.image_std))

    def pixels(self, image: Image.Image) -> np.ndarray:
        """uint8 array H x W x C at the model's size and channels."""
        image = image.convert("L" if self.channels == 1 else "RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8).reshape(self.size, self.size, self.channels)

    def tensor(self, pixels: np.ndarray) -> torch.Tensor:
        """Normalised float C x H x W tensor from uint8 H x W x C pixels."""
        scaled = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255.0
        mean, std = torch.tensor(self.mean).view(-1, 1, 1), torch.tensor(self.std).view(-1, 1, 1)
        return (scaled - mean) / std


def first_image(rows: Dataset, column: str, base_dir: Path | None) -> Image.Image:
    for i in range(min(len(rows), 50)):
        try:
            return decode(rows[i][column], base_dir)
        except (OSError, UnidentifiedImageError, ValueError):
            continue
    raise LlmtuneError(f"None of the first {min(len(rows), 50)} training images in column '{column}' can be read.")


def to_pixels(rows: Dataset, spec: PixelSpec, cfg: ImageConfig, label_ids: dict | None, split: str,
              base_dir: Path | None, label_column: str) -> tuple[Dataset, list[str]]:
    """Decode, convert and resize every image once (cached by datasets); returns the rows as `pixels` (bytes) and
    `labels`, and the unreadable images that were skipped."""

    def convert(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"pixels": [], "ok": [], "where": []}
        for value in batch[cfg.column]:
            try:
                out["pixels"].append(spec.pixels(decode(value, base_dir)).tobytes())
                out["ok"].append(True)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
                out["pixels"].append(b"")
                out["ok"].append(False)
                out["where"].append(f"{_describe(value)} ({type(exc).__name__})")
                continue
            out["where"].append("")
        if label_ids is not None and label_column in batch:
            out["labels"] = [label_ids.get(v, -1) for v in batch[label_column]]
        return out

    if isinstance(rows.features[cfg.column], ImageFeature):  # decode here, where a broken file can be skipped
        rows = rows.cast_column(cfg.column, ImageFeature(decode=False))
    # Arrays arrive as numpy (IDX digits): far faster than nested Python lists.
    source = rows.with_format("numpy") if is_array_column(rows, cfg.column) else rows
    converted = source.map(convert, batched=True, batch_size=256, remove_columns=rows.column_names,
                           desc=f"Decoding {split} images").with_format(None)  # numpy bytes_ would drop trailing zeros
    skipped = [w for w, ok in zip(converted["where"], converted["ok"]) if not ok]
    if skipped:
        converted = converted.filter(lambda ok: ok, input_columns="ok")
        logger.warning("Skipped %d unreadable %s image(s), e.g. %s", len(skipped), split, "; ".join(skipped[:3]))
    if len(converted) == 0:
        raise LlmtuneError(
            f"None of the {len(rows)} {split} images could be read (e.g. {'; '.join(skipped[:3])}). Check "
            f"'image.column' ('{cfg.column}') and that the files are images (PNG, JPEG, ...)."
        )
    return converted.remove_columns(["ok", "where"]), skipped


def is_array_column(rows: Dataset, column: str) -> bool:
    return type(rows.features[column]).__name__ in ("List", "Sequence", "Array2D", "Array3D")


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("path") or "image bytes")
    return value if isinstance(value, str) else type(value).__name__


# --- drawing batches ------------------------------------------------------------------------------------------


def batch_transform(spec: PixelSpec, shift: float = 0.0, rotation: float = 0.0):
    """datasets transform: pixels -> normalised tensors, with a random shift / rotation when augmenting."""

    def transform(batch: dict[str, list]) -> dict[str, list]:
        tensors = []
        for raw in batch["pixels"]:
            pixels = np.frombuffer(raw, dtype=np.uint8).reshape(spec.size, spec.size, spec.channels)
            if shift or rotation:
                pixels = augment(pixels, shift, rotation)
            tensors.append(spec.tensor(pixels))
        out = {"pixel_values": tensors}
        if "labels" in batch:
            out["labels"] = batch["labels"]
        return out

    return transform


def augment(pixels: np.ndarray, shift: float, rotation: float) -> np.ndarray:
    """A random rotation (degrees either way) and shift (fraction of the size either way); borders filled black."""
    image = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
    most = shift * pixels.shape[0]
    moved = image.rotate(random.uniform(-rotation, rotation), resample=Image.Resampling.BILINEAR,
                         translate=(round(random.uniform(-most, most)), round(random.uniform(-most, most))))
    return np.asarray(moved, dtype=np.uint8).reshape(pixels.shape)


def channel_stats(rows: Dataset, spec: PixelSpec, sample: int = 2000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (up to `sample`) training pixels, scaled to [0, 1]."""
    picked = rows.select(range(min(sample, len(rows))))["pixels"]
    stacked = np.stack([np.frombuffer(r, np.uint8).reshape(-1, spec.channels) for r in picked]).reshape(-1, spec.channels)
    scaled = stacked.astype(np.float64) / 255.0
    return [round(float(m), 4) for m in scaled.mean(0)], [round(max(float(s), 1e-3), 4) for s in scaled.std(0)]


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    out = {"pixel_values": torch.stack([r["pixel_values"] for r in rows])}
    if "labels" in rows[0]:
        out["labels"] = torch.tensor([r["labels"] for r in rows])
    return out
