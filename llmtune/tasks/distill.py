"""Distillation: a student classifier learns from a finished classification run (the teacher) and the labels.

The story, top to bottom: load the teacher -> load the data and check its labels are the teacher's -> tokenize
for the student -> the teacher's logits for every training row -> student (model.name, often the teacher's own
checkpoint with fewer blocks: model.num_layers) -> a Trainer whose loss mixes the teacher's softened predictions
with the labels (llmtune/tasks/distillation.py). The pipeline then trains, evaluates and saves as for classification.

Teacher logits are computed once, before training, and cached with the tokenized data: a classifier's logits are
a few numbers per row, so the teacher never has to sit in memory beside the student during training or run
again each epoch, and a second student trained on the same data and teacher reuses them. (On-the-fly logits pay
off only when the inputs change between epochs - augmentation - which text classification here does not do.)
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets
from peft import TaskType
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from llmtune.config.schema import DataConfig, Recipe
from llmtune.config.vocab import CLASSIFICATION_METRICS
from llmtune.data.loading import load_file, load_splits, require_columns
from llmtune.errors import LlmtuneError
from llmtune.inference.classifier import Classifier
from llmtune.metrics import MetricComputer
from llmtune.models.adapters import apply_method
from llmtune.models.loading import load_tokenizer, pretrained_classifier
from llmtune.models.sources import ResolvedModel
from llmtune.run.distributed import main_process_first
from llmtune.run.files import sha256
from llmtune.run.training import early_stopping, training_arguments
from llmtune.tasks.classification import after_training, check_data, encode, strip_prefix
from llmtune.tasks.distillation import DistillationTrainer
from llmtune.tasks.job import Job

logger = logging.getLogger(__name__)

MAIN_METRIC = "accuracy"


def build(recipe: Recipe, source: ResolvedModel, run_dir: Path, resume: bool = False) -> Job:
    """Load the teacher, the data and the student into a ready-to-train Trainer (nothing is trained yet)."""
    data, distill = recipe.data, recipe.distill

    # 1. Teacher: a finished classification run, in the precision it evaluated with
    teacher = load_teacher(distill.teacher)

    with main_process_first():  # other processes then read the datasets cache
        # 2. Data and labels: the teacher's labels, in the teacher's order
        splits = load_splits(data, recipe.training.seed)
        labels, label_ids = check_data(splits, data)
        check_teacher_labels(teacher, labels, distill.teacher)

        # 3. Tokenize for the student, then the teacher's logits for every training (and eval) row
        tokenizer = load_tokenizer(source.path, recipe)
        encoded = DatasetDict({split: encode(rows, tokenizer, data, label_ids, split) for split, rows in splits.items()})
        train_logits = teacher_logits(teacher, splits["train"], data, distill.teacher)
        encoded["train"] = encoded["train"].add_column("teacher_logits", train_logits["teacher_logits"])
        if distill.transfer_file:  # unlabelled rows the student learns from the teacher alone
            transfer = transfer_rows(distill.transfer_file, data)
            scored = encode(transfer, tokenizer, data, {}, "transfer").add_column(
                "teacher_logits", teacher_logits(teacher, transfer, data, distill.teacher)["teacher_logits"])
            encoded["train"] = concatenate_datasets([encoded["train"], scored.cast(encoded["train"].features)])
        teacher_scores = {}
        if "eval" in splits:
            eval_logits = np.array(teacher_logits(teacher, splits["eval"], data, distill.teacher)["teacher_logits"])
            references = np.array(encoded["eval"]["labels"])
            teacher_scores = {"accuracy": float((eval_logits.argmax(-1) == references).mean())}
    del teacher  # the student trains alone

    # 4. Student: model.name (with model.keep_layers / num_layers), a head for the teacher's labels; full / LoRA
    # ignore_mismatched_sizes: a student from another checkpoint brings a head of another size
    model = pretrained_classifier(recipe, source.path, labels, AutoModelForSequenceClassification,
                                  ignore_mismatched_sizes=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = apply_method(model, recipe.method, TaskType.SEQ_CLS, recipe.training.gradient_checkpointing)

    # 5. Trainer: the distillation loss on training batches, plain cross-entropy on evaluation
    scores = MetricComputer(recipe.eval.metrics or list(CLASSIFICATION_METRICS), len(labels))
    trainer = DistillationTrainer(
        model=model,
        args=training_arguments(recipe, str(run_dir), MAIN_METRIC, "eval" in encoded, resume,
                                remove_unused_columns=False, average_tokens_across_devices=False),
        train_dataset=encoded["train"],
        eval_dataset=encoded.get("eval"),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=scores,
        callbacks=early_stopping(recipe.training),
        alpha=distill.alpha,
        temperature=distill.temperature,
    )
    return Job(
        trainer, source.path, summarize=strip_prefix,
        record={"labels": labels, "data_sizes": {split: len(rows) for split, rows in encoded.items()},
                "labelled_train_rows": len(splits["train"]),
                "teacher": {"path": str(Path(distill.teacher).resolve()), "logits": "computed once, before training"}},
        metrics={"teacher": teacher_scores} if teacher_scores else {},
        after_training=partial(after_training, trainer, scores, splits, encoded, labels, data),
    )


def validate(recipe: Recipe, source: ResolvedModel) -> dict[str, Any]:
    """What `llmtune validate` reports: the data's splits and labels, checked against the teacher's."""
    splits = load_splits(recipe.data, recipe.training.seed)
    labels, _ = check_data(splits, recipe.data)
    check_teacher_labels(load_teacher(recipe.distill.teacher), labels, recipe.distill.teacher)
    return {"rows": {split: len(rows) for split, rows in splits.items()}, "labels": labels,
            "teacher": recipe.distill.teacher}


# --- pieces -------------------------------------------------------------------------------------------


def load_teacher(path: str) -> Classifier:
    from llmtune.inference.trained import model_kind

    if not Path(path).is_dir():
        raise LlmtuneError(
            f"'distill.teacher' is '{path}', which is not a folder. Give the run directory of a finished "
            "classification run (llmtune train with task classification), or a classifier's model folder."
        )
    kind = model_kind(path)
    if kind not in (None, "classification", "distill"):
        raise LlmtuneError(
            f"'distill.teacher' is '{path}', a {kind} run; a teacher must be a text classifier (task classification "
            "or distill)."
        )
    return Classifier.load(path)


def check_teacher_labels(teacher: Classifier, labels: list[str], path: str) -> None:
    if teacher.labels != labels:
        raise LlmtuneError(
            f"The teacher '{path}' predicts the labels {teacher.labels}, but the training data's labels are {labels}. "
            "A student learns the teacher's label set: train on data with the same labels (check data.label_column "
            "and data.label_names), or train a teacher on this data first."
        )


def transfer_rows(path: str, data: DataConfig) -> Dataset:
    """distill.transfer_file's rows, labelled -1 (no label) whatever the file says."""
    rows = load_file(path, "distill.transfer_file")
    require_columns(rows, "transfer", {"data.text_column": data.text_column, "data.text_pair_column": data.text_pair_column})
    keep = [c for c in (data.text_column, data.text_pair_column) if c]
    rows = rows.select_columns(keep)
    return rows.add_column(data.label_column, [-1] * len(rows))


def teacher_logits(teacher: Classifier, rows: Dataset, data: DataConfig, teacher_path: str) -> Dataset:
    """A 'teacher_logits' column for `rows`, computed in batches once and cached by datasets (the key covers the
    rows, the teacher's weights and the text columns)."""
    weights = [sha256(p) for p in sorted(Path(teacher_path).glob("*.safetensors"))]

    def score(batch: dict[str, list]) -> dict[str, list]:
        pairs = batch[data.text_pair_column] if data.text_pair_column else None
        return {"teacher_logits": teacher.logits(batch[data.text_column], pairs).tolist()}

    from llmtune.data.fingerprint import derived_fingerprint

    logger.info("Teacher logits for %d rows (computed once, then read from the datasets cache)", len(rows))
    return rows.map(score, batched=True, batch_size=256, remove_columns=rows.column_names,
                    desc="Teacher logits", new_fingerprint=derived_fingerprint(
                        rows, "teacher-logits", __file__, teacher.tokenizer, weights=weights,
                        text=data.text_column, pair=data.text_pair_column, max_length=teacher.max_length,
                        precision=teacher.precision))
