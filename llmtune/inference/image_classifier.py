"""Use a trained image classifier: load a run and predict the labels of image files, or score a labelled image set,
preparing pixels exactly as training did (the pixel format is kept in the model's config)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Image
from PIL import UnidentifiedImageError
from transformers import AutoModelForImageClassification

from llmtune.data.images import PixelSpec, decode, is_array_column
from llmtune.errors import LlmtuneError
from llmtune.inference.trained import load_trained
from llmtune.metrics import MetricComputer, softmax
from llmtune.models.vision import SCRATCH_MODELS  # noqa: F401 - registers llmtune's CNN / MLP with the Auto classes
from llmtune.run.precision import evaluation_precision


@dataclass
class ImageClassifier:
    model: torch.nn.Module
    spec: PixelSpec
    labels: list[str]
    columns: dict[str, str]  # image / label columns the run was trained with
    precision: str = "fp32"
    batch_size: int = 64

    @classmethod
    def load(cls, path: str | Path, precision: str = "auto") -> ImageClassifier:
        if not Path(path).is_dir():
            raise LlmtuneError(f"'{path}' is not a folder. Give a run directory or one of its checkpoint-N folders.")
        model, _, record = load_trained(path, AutoModelForImageClassification)
        config = model.config
        recipe = record.get("recipe") or {}
        columns = {"image": recipe.get("image", {}).get("column", "image"),
                   "label": recipe.get("data", {}).get("label_column", "label")}
        if precision == "auto":
            precision = record.get("precision", {}).get("evaluation", "fp32")
        training = recipe.get("training", {})
        batch_size = training.get("eval_batch_size") or 2 * training.get("batch_size", 32)
        labels = [config.id2label[i] for i in range(config.num_labels)]
        return cls(model, PixelSpec.from_config(config), labels, columns, precision, batch_size)

    @torch.inference_mode()
    def probabilities(self, images: list[Any], names: list[str] | None = None) -> np.ndarray:
        """Class probabilities for each image (a path, bytes, PIL image or pixel array), in label order."""
        rows = []
        for start in range(0, len(images), self.batch_size):
            batch = []
            for i, image in enumerate(images[start : start + self.batch_size], start):
                try:
                    batch.append(self.spec.tensor(self.spec.pixels(decode(image))))
                except (OSError, UnidentifiedImageError, ValueError) as exc:
                    raise LlmtuneError(
                        f"Image '{(names or images)[i]}' cannot be read ({type(exc).__name__}: {exc}). Give PNG, "
                        "JPEG, BMP, GIF, WebP or TIFF files."
                    ) from None
            with evaluation_precision(self.precision, self.model.device.type):
                logits = self.model(pixel_values=torch.stack(batch)).logits
            rows.append(softmax(logits.float().numpy()))
        return np.concatenate(rows) if rows else np.zeros((0, len(self.labels)))

    def predict(self, images: list[Any], names: list[str] | None = None) -> list[dict[str, Any]]:
        return [{"label": self.labels[int(p.argmax())],
                 "probabilities": {name: round(float(v), 6) for name, v in zip(self.labels, p)}}
                for p in self.probabilities(images, names)]

    def evaluate(self, rows: Any, metrics: list[str], base_dir: Path | None = None) -> dict[str, Any]:
        """Metrics on labelled image rows (a datasets.Dataset with the run's image and label columns); relative image
        paths are taken from `base_dir` (the data file's folder)."""
        from llmtune.data.loading import require_columns

        require_columns(rows, "eval", {"--image-column": self.columns["image"], "--label-column": self.columns["label"]})
        class_names = getattr(rows.features[self.columns["label"]], "names", None)  # imagefolder's subfolders
        label2id = {name: i for i, name in enumerate(self.labels)}
        references = []
        for value in rows[self.columns["label"]]:
            name = class_names[value] if class_names else str(value)
            if name not in label2id:
                raise LlmtuneError(f"The eval data has label {name!r}, which the model never saw in training. "
                                   f"Its labels are: {', '.join(self.labels)}.")
            references.append(label2id[name])
        column = self.columns["image"]
        if isinstance(rows.features[column], Image):  # decoded here, so a broken file is named, not a traceback
            rows = rows.cast_column(column, Image(decode=False))
        images = list(rows.with_format("numpy")[column] if is_array_column(rows, column) else rows[column])
        if base_dir is not None:
            images = [str(base_dir / image) if isinstance(image, str) and not Path(image).is_absolute() else image
                      for image in images]
        names = [image if isinstance(image, str) else (image.get("path") if isinstance(image, dict) else None)
                 or f"row {i}" for i, image in enumerate(images)]
        probabilities = self.probabilities(images, names)
        scores = MetricComputer(metrics, len(self.labels)).score(probabilities, np.array(references))
        return {"samples": len(references), "computed_in": self.precision, **scores}
