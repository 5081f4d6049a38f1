"""Image classification: a pretrained vision checkpoint (full, LoRA, DoRA) or a small CNN / MLP from zero.

The story, top to bottom: load the data -> build the label set -> settle the pixel format (the checkpoint's
image processor, or the training images themselves) -> decode every image once -> model -> Trainer. The pipeline
then evaluates before, trains, evaluates after and saves; this task adds the confusion matrix and the test split's
predictions. Augmentation (image.shift / image.rotation) applies to training batches only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer

from llmtune.config.schema import Recipe
from llmtune.config.vocab import CLASSIFICATION_METRICS
from llmtune.data.images import PixelSpec, batch_transform, channel_stats, collate, first_image, to_pixels
from llmtune.data.loading import load_splits, require_columns
from llmtune.errors import LlmtuneError
from llmtune.metrics import MetricComputer, class_report, softmax
from llmtune.models.adapters import apply_method
from llmtune.models.loading import label_arguments, pretrained_classifier
from llmtune.models.sources import ResolvedModel
from llmtune.models.vision import SCRATCH_MODELS
from llmtune.run.distributed import main_process_first
from llmtune.run.files import write_text
from llmtune.run.training import early_stopping, training_arguments
from llmtune.tasks.classification import build_label_names, check_known_labels, strip_prefix
from llmtune.tasks.job import Job

logger = logging.getLogger(__name__)

MAIN_METRIC = "accuracy"


def build(recipe: Recipe, source: ResolvedModel | None, run_dir: Path, resume: bool = False) -> Job:
    """Load, decode and wrap everything into a ready-to-train Trainer (nothing is trained yet)."""
    data, image = recipe.data, recipe.image

    with main_process_first():  # other processes then read the datasets cache
        # 1. Data and labels
        splits = load_splits(data, recipe.training.seed)
        labels, label_ids = check_data(splits, recipe)

        # 2. Pixel format: the checkpoint's image processor, or the training images for a model from scratch
        processor = AutoImageProcessor.from_pretrained(source.path) if source else None
        spec = pixel_spec(recipe, processor, splits["train"])

        # 3. Decode, convert and resize every image once (cached); unreadable ones are skipped and counted
        pixels, skipped = {}, {}
        for split, rows in splits.items():
            pixels[split], skipped[split] = to_pixels(rows, spec, image, label_ids, split, _base_dir(recipe, split),
                                                      data.label_column)
    if source is None:  # a model from zero normalises with the training images' own statistics
        spec.mean, spec.std = channel_stats(pixels["train"], spec)

    # 4. Model: the checkpoint with a new head, or a CNN / MLP from zero; then full / LoRA / DoRA
    if source is None:
        config_class, model_class = SCRATCH_MODELS[recipe.scratch.architecture]
        model = model_class(config_class(layers=recipe.scratch.layers, hidden_size=recipe.scratch.hidden_size,
                                         dropout=recipe.scratch.dropout, **label_arguments(labels)))
    else:
        model = pretrained_classifier(recipe, source.path, labels, AutoModelForImageClassification,
                                      keep_unquantized=None, ignore_mismatched_sizes=True)
    spec.save_to(model.config)  # the saved model carries its preprocessing (llmtune predict --image reads it)
    method = recipe.method
    if method.type != "full" and method.modules_to_save is None:
        method = dataclasses.replace(method, modules_to_save=["classifier"])  # the new head trains in full
    model = apply_method(model, method, None, recipe.training.gradient_checkpointing)

    # 5. Trainer: batches are drawn through the transform (augmented for training only)
    plain = batch_transform(spec)
    encoded = DatasetDict({split: rows.with_transform(plain) for split, rows in pixels.items()})
    encoded["train"] = pixels["train"].with_transform(batch_transform(spec, image.shift, image.rotation))
    scores = MetricComputer(recipe.eval.metrics or list(CLASSIFICATION_METRICS), len(labels))
    trainer = Trainer(
        model=model,
        args=training_arguments(recipe, str(run_dir), MAIN_METRIC, "eval" in encoded, resume, padded=False,
                                remove_unused_columns=False, average_tokens_across_devices=False),
        train_dataset=encoded["train"],
        eval_dataset=encoded.get("eval"),
        processing_class=processor,
        data_collator=collate,
        compute_metrics=scores,
        callbacks=early_stopping(recipe.training),
    )
    return Job(
        trainer, source.path if source else None, summarize=strip_prefix,
        record={"labels": labels, "data_sizes": {split: len(rows) for split, rows in pixels.items()},
                "pixels": dataclasses.asdict(spec),
                "skipped_images": {split: len(s) for split, s in skipped.items() if s}},
        after_training=partial(after_training, trainer, scores, splits, encoded, labels, recipe),
    )


def validate(recipe: Recipe, source: ResolvedModel | None) -> dict[str, Any]:
    """What `llmtune validate` reports: the splits, labels and pixel format training would use."""
    splits = load_splits(recipe.data, recipe.training.seed)
    labels, _ = check_data(splits, recipe)
    processor = AutoImageProcessor.from_pretrained(source.path) if source else None
    spec = pixel_spec(recipe, processor, splits["train"])
    return {"rows": {split: len(rows) for split, rows in splits.items()}, "labels": labels,
            "pixels": f"{spec.size} x {spec.size}, {spec.channels} channel(s)"}


# --- pieces -------------------------------------------------------------------------------------------


def check_data(splits: DatasetDict, recipe: Recipe) -> tuple[list[str], dict]:
    """Check the image and label columns of every split; return label names and the raw-label -> id map."""
    data = recipe.data
    for split, rows in splits.items():
        columns = {"image.column": recipe.image.column}
        if split != "test":
            columns["data.label_column"] = data.label_column
        require_columns(rows, split, columns)
    train_labels = splits["train"][data.label_column]
    labels = build_label_names(train_labels, data.label_names or _class_names(splits["train"], data.label_column))
    values = sorted(set(train_labels), key=lambda v: (isinstance(v, str), v))
    label_ids = {value: i for i, value in enumerate(values)}
    if "eval" in splits:
        check_known_labels(splits["eval"][data.label_column], label_ids, "eval")
    return labels, label_ids


def _class_names(rows: Dataset, column: str) -> list[str] | None:
    """imagefolder's class names (its label column is a ClassLabel over the subfolder names)."""
    feature = rows.features[column]
    names = getattr(feature, "names", None)
    if names is None:
        return None
    used = sorted(set(rows[column]))
    return [names[i] for i in used] if used == list(range(len(used))) else None


def pixel_spec(recipe: Recipe, processor: Any, train: Dataset) -> PixelSpec:
    """Size and channels from image.size / image.channels, else the image processor, else the first training image."""
    image = recipe.image
    if processor is not None:
        size = image.size or _processor_size(processor)
        if image.channels == 1:
            raise LlmtuneError(
                "'image.channels' is 1, but pretrained vision checkpoints read RGB images (3 channels); llmtune "
                "converts grayscale images for them. Leave image.channels at auto (or 3)."
            )
        return PixelSpec(size, 3, list(processor.image_mean), list(processor.image_std))
    first = first_image(train, image.column, _base_dir(recipe, "train"))
    channels = image.channels if image.channels != "auto" else (1 if first.mode in ("1", "L", "I", "I;16", "F") else 3)
    return PixelSpec(image.size or max(first.size), channels, [0.5] * channels, [0.5] * channels)


def _processor_size(processor: Any) -> int:
    """The square side an image processor produces: its crop size, else its size (a dict or transformers' SizeDict)."""
    size = getattr(processor, "crop_size", None) or processor.size
    if isinstance(size, int):
        return size
    read = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    return int(read("height") or read("shortest_edge") or read("longest_edge"))


def _base_dir(recipe: Recipe, split: str) -> Path | None:
    """Image paths in a data file are taken from the file's folder."""
    file = getattr(recipe.data, f"{split}_file", None) or (recipe.data.train_file if split == "eval" else None)
    return Path(file).resolve().parent if file else None


def after_training(trainer: Trainer, scores: MetricComputer, splits: DatasetDict, encoded: DatasetDict,
                   labels: list[str], recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """The confusion matrix and per-class scores of the last evaluation, then the test split's predictions."""
    found = {"eval_details": class_report(labels, *scores.last)} if scores.last is not None else {}
    if "test" not in encoded:
        return found
    output = trainer.predict(encoded["test"], metric_key_prefix="test")
    images = splits["test"][recipe.image.column] if isinstance(splits["test"][0][recipe.image.column], str) else None
    lines = []
    for i, probs in enumerate(softmax(output.predictions)):
        record = {"image": images[i] if images else i, "label": labels[int(probs.argmax())],
                  "probabilities": {name: round(float(p), 6) for name, p in zip(labels, probs)}}
        lines.append(json.dumps(record))
    if trainer.is_world_process_zero():
        write_text(run_dir / "predictions.jsonl", "\n".join(lines) + "\n")
    return found | ({"test": strip_prefix(output.metrics, "test_")} if output.label_ids is not None else {})
