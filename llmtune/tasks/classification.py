"""Text classification (single sentences or sentence pairs) on an encoder, or a decoder with a head.

The story, top to bottom: load the checkpoint and the data -> build the label set -> tokenize -> model
(full, LoRA or DoRA) -> Trainer -> evaluate before -> train -> evaluate after -> save -> predict the test set.
`build()` stops before training, so Python users can take the Trainer and drive it themselves.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from peft import TaskType
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PreTrainedTokenizerBase,
    Trainer,
)

from llmtune.config.schema import DataConfig, Recipe
from llmtune.data.lm_tokenize import ensure_pad_token
from llmtune.data.loading import load_splits, require_columns
from llmtune.distributed import main_process_first
from llmtune.errors import LlmtuneError
from llmtune.hub.push import push, require_token
from llmtune.metrics import AVAILABLE_METRICS, load_metric
from llmtune.models.adapters import apply_method
from llmtune.models.quantization import load_arguments as quantized_loading
from llmtune.models.sources import resolve_model
from llmtune.models.trained import save_trained
from llmtune.runs import (
    METRICS_FILE,
    check_run_dir,
    run_dir_for,
    start_run,
    write_json,
    write_text,
)
from llmtune.training import train_and_evaluate, training_arguments

logger = logging.getLogger(__name__)

MAIN_METRIC = "accuracy"
CLASSIFIER_HEADS = ["classifier", "score"]  # head names across encoders and decoders; trained in full precision
UNLABELED = (-1, None, "")  # how unlabeled test rows are marked (GLUE test splits use -1)


@dataclass
class ClassificationJob:
    """Everything a classification run needs once it is built: the Trainer and what surrounds it."""

    recipe: Recipe
    trainer: Trainer
    run_dir: Path
    splits: DatasetDict  # raw rows, kept for the predictions file
    encoded: DatasetDict
    labels: list[str]
    model_path: str


def build(recipe: Recipe, resume: bool = False) -> ClassificationJob:
    """Load, tokenize and wrap everything into a ready-to-train Trainer (nothing is trained yet)."""
    data = recipe.data
    source = resolve_model(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
    run_dir = run_dir_for(recipe.output.dir, recipe.task, source.short_name, resume)
    check_run_dir(run_dir, recipe.output.overwrite, resume)

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
    model_source = {"revision": recipe.model.revision, "trust_remote_code": recipe.model.trust_remote_code}
    model = AutoModelForSequenceClassification.from_pretrained(
        source.path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        use_safetensors=True,
        **model_source,
        **{"dtype": recipe.model.dtype,
           **quantized_loading(recipe.method, source.path, keep_unquantized=CLASSIFIER_HEADS, **model_source)},
    )
    model.config.pad_token_id = tokenizer.pad_token_id  # decoders need it to find the last real token
    model = apply_method(model, recipe.method, TaskType.SEQ_CLS, recipe.training.gradient_checkpointing)

    # 4. Trainer
    has_eval = "eval" in encoded and recipe.training.eval_every != "no"
    callbacks = []
    if recipe.training.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(recipe.training.early_stopping_patience))
    trainer = Trainer(
        model=model,
        # The loss is a mean over examples. With token averaging across devices on (the default), transformers
        # multiplies every loss that accepts **kwargs by the number of processes, expecting it to be divided by
        # the global token count - which a classification loss never is: losses and gradients would double.
        args=training_arguments(recipe.training, str(run_dir), MAIN_METRIC, has_eval,
                                average_tokens_across_devices=False),
        train_dataset=encoded["train"],
        eval_dataset=encoded.get("eval"),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=MetricComputer(recipe.eval.metrics or list(AVAILABLE_METRICS), len(labels)),
        callbacks=callbacks,
    )
    return ClassificationJob(recipe, trainer, run_dir, splits, encoded, labels, source.path)


def run(recipe: Recipe, resume: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate, save and predict; returns the metrics written to metrics.json."""
    if recipe.output.push_to_hub:
        require_token()  # fail before training, not after it
    job = build(recipe, resume)
    trainer, run_dir = job.trainer, job.run_dir
    start_run(run_dir, recipe, overrides, resume, trainer, model_path=job.model_path, labels=job.labels,
              data_sizes={split: len(rows) for split, rows in job.splits.items()})
    metrics = train_and_evaluate(trainer, run_dir, resume, recipe.eval.before_training, _strip)

    save_trained(trainer, run_dir, recipe.output.save, job.model_path)
    if "test" in job.encoded:
        test_metrics = write_predictions(trainer, job, run_dir / "predictions.jsonl")
        if test_metrics:
            metrics["test"] = test_metrics
    if trainer.is_world_process_zero():  # one writer, one report, one push
        write_json(run_dir / METRICS_FILE, metrics)
        _report(metrics, run_dir)
        if recipe.output.push_to_hub:
            push(run_dir, recipe.output.push_to_hub, recipe.output.hub_private)
    return metrics


# --- pieces shared with prediction and evaluation of saved runs ---------------------------------------


def load_tokenizer(path: str, recipe: Recipe) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
    )
    ensure_pad_token(tokenizer)
    return tokenizer


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
    )
    if split == "test" and has_labels and all(v == -1 for v in encoded["labels"]):
        encoded = encoded.remove_columns("labels")  # an unlabeled test split (e.g. GLUE's -1 labels)
    return encoded


class MetricComputer:
    """compute_metrics for the Trainer: logits -> probabilities -> the recipe's metrics."""

    def __init__(self, names: list[str], num_labels: int):
        if "roc_auc" in names and num_labels != 2:
            logger.info("roc_auc is defined here for binary tasks only; skipping it for %d labels.", num_labels)
        self.names = [n for n in names if n != "roc_auc" or num_labels == 2]
        self.modules = {name: load_metric(name) for name in self.names}

    def __call__(self, prediction) -> dict[str, float]:
        return self.score(softmax(prediction.predictions), prediction.label_ids)

    def score(self, probabilities: np.ndarray, references: np.ndarray) -> dict[str, float]:
        predicted = probabilities.argmax(-1)
        results: dict[str, float] = {}
        for name, module in self.modules.items():
            if name == "roc_auc":
                results.update(module.compute(prediction_scores=probabilities[:, 1], references=references))
            else:
                results.update(module.compute(predictions=predicted, references=references))
        return results


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=-1).numpy()


def write_predictions(trainer: Trainer, job: ClassificationJob, path: Path) -> dict[str, float]:
    """Predict the test split into a JSON-lines file; return test metrics when the split has labels."""
    output = trainer.predict(job.encoded["test"], metric_key_prefix="test")
    probabilities = softmax(output.predictions)
    rows = job.splits["test"]
    data = job.recipe.data
    lines = []
    for i, probs in enumerate(probabilities):
        record = {"text": rows[i][data.text_column]}
        if data.text_pair_column:
            record["text_pair"] = rows[i][data.text_pair_column]
        record["label"] = job.labels[int(probs.argmax())]
        record["probabilities"] = {name: round(float(p), 6) for name, p in zip(job.labels, probs)}
        lines.append(json.dumps(record))
    if trainer.is_world_process_zero():
        write_text(path, "\n".join(lines) + "\n")
        logger.info("Wrote %d predictions to %s", len(lines), path)
    return _strip(output.metrics, "test_") if output.label_ids is not None else {}


def _strip(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): v for k, v in metrics.items()}


def _report(metrics: dict[str, Any], run_dir: Path) -> None:
    before, after = metrics.get("before", {}), metrics.get("after", {})
    for name in after:
        if name in before and not name.endswith(("runtime", "per_second", "epoch", "preparation_time")):
            logger.info("%-10s before %.4f -> after %.4f", name, before[name], after[name])
    logger.info("Run saved in %s", run_dir)
