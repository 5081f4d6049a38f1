"""Text classification (single sentences or sentence pairs) on an encoder, or a decoder with a head.

The story, top to bottom: load the data -> build the label set -> tokenize -> model (full, LoRA or DoRA, on a
quantized base for QLoRA) -> Trainer. The pipeline (llmtune/pipeline.py) then evaluates before, trains, evaluates
after and saves; this task adds the predictions file for the test split. `build()` stops before training, so
Python users can take the Trainer and drive it themselves.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from peft import TaskType
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, PreTrainedTokenizerBase, Trainer

from llmtune.config.schema import DataConfig, Recipe
from llmtune.config.vocab import CLASSIFICATION_METRICS
from llmtune.data.fingerprint import derived_fingerprint
from llmtune.data.loading import load_splits, require_columns
from llmtune.errors import LlmtuneError
from llmtune.metrics import MetricComputer, class_report, softmax
from llmtune.models.adapters import apply_method
from llmtune.models.loading import load_tokenizer, pretrained_classifier
from llmtune.models.sources import ResolvedModel
from llmtune.run.distributed import main_process_first
from llmtune.run.files import write_text
from llmtune.run.training import early_stopping, training_arguments
from llmtune.tasks.job import Job

logger = logging.getLogger(__name__)

MAIN_METRIC = "accuracy"
UNLABELED = (-1, None, "")  # how unlabeled test rows are marked (GLUE test splits use -1)


def build(recipe: Recipe, source: ResolvedModel, run_dir: Path, resume: bool = False) -> Job:
    """Load, tokenize and wrap everything into a ready-to-train Trainer (nothing is trained yet)."""
    data = recipe.data

    with main_process_first():  # other processes then read the datasets cache
        # 1. Data and labels
        splits = load_splits(data, recipe.training.seed)
        labels, label_ids = check_data(splits, data)

        # 2. Tokenize (batched, cached by datasets between runs)
        tokenizer = load_tokenizer(source.path, recipe)
        encoded = DatasetDict(
            {split: encode(rows, tokenizer, data, label_ids, split) for split, rows in splits.items()}
        )

    # 3. Model: pretrained body (quantized for QLoRA), fresh head sized to the label set, then full / LoRA / DoRA
    model = pretrained_classifier(recipe, source.path, labels, AutoModelForSequenceClassification)
    model.config.pad_token_id = tokenizer.pad_token_id  # decoders need it to find the last real token
    model = apply_method(model, recipe.method, TaskType.SEQ_CLS, recipe.training.gradient_checkpointing)

    # 4. Trainer
    scores = MetricComputer(recipe.eval.metrics or list(CLASSIFICATION_METRICS), len(labels))
    trainer = Trainer(
        model=model,
        # The loss is a mean over examples. With token averaging across devices on (the default), transformers
        # multiplies every loss that accepts **kwargs by the number of processes, expecting it to be divided by
        # the global token count - which a classification loss never is: losses and gradients would double.
        args=training_arguments(recipe, str(run_dir), MAIN_METRIC, "eval" in encoded, resume,
                                average_tokens_across_devices=False),
        train_dataset=encoded["train"],
        eval_dataset=encoded.get("eval"),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=scores,
        callbacks=early_stopping(recipe.training),
    )
    return Job(
        trainer, source.path, summarize=strip_prefix,
        record={"labels": labels, "data_sizes": {split: len(rows) for split, rows in splits.items()}},
        after_training=partial(after_training, trainer, scores, splits, encoded, labels, data),
    )


def validate(recipe: Recipe, source: ResolvedModel) -> dict[str, Any]:
    """What `llmtune validate` reports: the data's splits and labels as training would read them."""
    splits = load_splits(recipe.data, recipe.training.seed)
    labels, _ = check_data(splits, recipe.data)
    return {"rows": {split: len(rows) for split, rows in splits.items()}, "labels": labels}


# --- pieces -------------------------------------------------------------------------------------------


def check_data(splits: DatasetDict, data: DataConfig) -> tuple[list[str], dict]:
    """Check columns and labels of every split; return label names and the raw-label -> id map."""
    for split, rows in splits.items():
        columns = {"data.text_column": data.text_column, "data.text_pair_column": data.text_pair_column}
        if split != "test":
            columns["data.label_column"] = data.label_column
        require_columns(rows, split, columns)
    labels = build_label_names(splits["train"][data.label_column], data.label_names)
    label_ids = {value: i for i, value in enumerate(_label_values(splits["train"][data.label_column]))}
    if "eval" in splits:
        check_known_labels(splits["eval"][data.label_column], label_ids, "eval")
    return labels, label_ids


def _label_values(values: list) -> list:
    return sorted({v for v in values if v not in UNLABELED}, key=lambda v: (isinstance(v, str), v))


def build_label_names(train_labels: list, label_names: list[str] | None) -> list[str]:
    """Label names in id order: the sorted distinct training labels (or `data.label_names` for integers)."""
    values = _label_values(train_labels)
    if len(values) < 2:
        raise LlmtuneError(
            f"The training data has {len(values)} distinct label(s) ({values}); classification needs at least "
            "two. Check 'data.label_column' and the training file."
        )
    if label_names is None:
        return [str(v) for v in values]
    if values != list(range(len(label_names))):
        raise LlmtuneError(
            f"'data.label_names' names {len(label_names)} labels ({label_names}), but the training labels are "
            f"{values}. label_names works with integer labels 0..N-1; drop it for string labels."
        )
    return list(label_names)


def check_known_labels(values: list, label_ids: dict, split: str) -> None:
    unseen = sorted({str(v) for v in values if v not in label_ids and v not in UNLABELED})
    if unseen:
        raise LlmtuneError(
            f"The {split} data has labels never seen in training: {', '.join(unseen)}. The model can only "
            f"predict the training labels ({', '.join(str(k) for k in label_ids)}); add examples of these "
            "labels to the training data or remove them from the eval data."
        )


def encode(
    rows: Dataset, tokenizer: PreTrainedTokenizerBase, data: DataConfig, label_ids: dict, split: str
) -> Dataset:
    """Tokenize text (and text pair) and map labels to ids; unlabeled rows get label -1 (test only)."""
    has_labels = data.label_column in rows.column_names

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        pair = batch[data.text_pair_column] if data.text_pair_column else None
        out = tokenizer(batch[data.text_column], pair, truncation=True, max_length=data.max_length)
        if has_labels:
            out["labels"] = [label_ids.get(v, -1) for v in batch[data.label_column]]
        return out

    encoded = rows.map(
        tokenize,
        batched=True,
        remove_columns=rows.column_names,
        num_proc=data.preprocessing_workers,
        desc=f"Tokenizing {split}",
        new_fingerprint=derived_fingerprint(
            rows, "classification-encode", __file__, tokenizer, text=data.text_column, pair=data.text_pair_column,
            label=data.label_column if has_labels else None, max_length=data.max_length, labels=sorted(
                label_ids.items(), key=lambda item: str(item[0]))),
    )
    if split == "test" and has_labels and all(v == -1 for v in encoded["labels"]):
        encoded = encoded.remove_columns("labels")  # an unlabeled test split (e.g. GLUE's -1 labels)
    return encoded


def after_training(trainer: Trainer, scores: MetricComputer, splits: DatasetDict, encoded: DatasetDict,
                   labels: list[str], data: DataConfig, run_dir: Path) -> dict[str, Any]:
    """The confusion matrix and per-class scores of the evaluation after training (for the report), then the test
    split's predictions."""
    found = {"eval_details": class_report(labels, *scores.last)} if scores.last is not None else {}
    if "test" in encoded:
        found |= write_predictions(trainer, splits, encoded, labels, data, run_dir)
    return found


def write_predictions(
    trainer: Trainer, splits: DatasetDict, encoded: DatasetDict, labels: list[str], data: DataConfig, run_dir: Path
) -> dict[str, Any]:
    """Predict the test split into predictions.jsonl; return {'test': metrics} when the split has labels."""
    output = trainer.predict(encoded["test"], metric_key_prefix="test")
    probabilities = softmax(output.predictions)
    rows = splits["test"]
    lines = []
    for i, probs in enumerate(probabilities):
        record = {"text": rows[i][data.text_column]}
        if data.text_pair_column:
            record["text_pair"] = rows[i][data.text_pair_column]
        record["label"] = labels[int(probs.argmax())]
        record["probabilities"] = {name: round(float(p), 6) for name, p in zip(labels, probs)}
        lines.append(json.dumps(record))
    if trainer.is_world_process_zero():
        write_text(run_dir / "predictions.jsonl", "\n".join(lines) + "\n")
        logger.info("Wrote %d predictions to %s", len(lines), run_dir / "predictions.jsonl")
    return {"test": strip_prefix(output.metrics, "test_")} if output.label_ids is not None else {}


def strip_prefix(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): v for k, v in metrics.items()}
