"""Weak cases a probe found, checked in this process in seconds: a full disk in each of the shapes torch and
safetensors report it, a stop signal that arrives during an evaluation inside training (tests/test_faults.py has
the same with a real process and model), and the model card of a model that has no Hub id."""

from __future__ import annotations

import dataclasses
import errno
import inspect
import json
import os
import shutil
import signal
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors import SafetensorError
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from llmtune.config.loader import load_recipe
from llmtune.config.schema import TrainingConfig
from llmtune.errors import TrainingStopped
from llmtune.hub.model_card import render, write_run_card
from llmtune.run import checkpoints
from llmtune.run.checkpoints import MARKER, describe_write_error, save_failure, why_incomplete
from llmtune.run.training import attach_run_callbacks, train_and_evaluate

MiB = 2**20
Usage = namedtuple("Usage", "total used free")


def torch_short_write() -> RuntimeError:
    """What torch.save raised on a full tmpfs (torch 2.13): the C++ stream's failure, then the zip writer's."""
    try:
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # noqa: B904
    except RuntimeError as exc:
        return exc


@pytest.fixture()
def free_space(monkeypatch):
    """Set what shutil.disk_usage reports as free (bytes), or a function of the folder."""
    holder = {"free": 87 * MiB}

    def usage(path):
        free = holder["free"](path) if callable(holder["free"]) else holder["free"]
        return Usage(100 * 2**30, 100 * 2**30 - free, free)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    return holder


@pytest.mark.parametrize("error", [
    torch_short_write(),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    OSError(errno.ENOSPC, "No space left on device"),
], ids=["torch-unexpected-pos", "safetensors", "errno-ENOSPC"])
def test_every_shape_of_a_full_disk_is_called_a_full_disk(tmp_path, free_space, error):
    assert describe_write_error(error, tmp_path) == f"the disk holding '{tmp_path}' is full (87 MiB free)"


def test_a_short_torch_write_with_room_left_names_the_likely_causes(tmp_path, free_space):
    free_space["free"] = 40 * 2**30
    message = describe_write_error(torch_short_write(), tmp_path)
    assert "unexpected pos 576 vs 534" in message and "40,960 MiB free" in message and "quota" in message
    assert "is full" not in message  # not claimed when the disk says otherwise


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, free_space):
    message = describe_write_error(PermissionError(errno.EACCES, "Permission denied"), tmp_path)
    assert message == "PermissionError: [Errno 13] Permission denied (87 MiB free there)"


def test_a_failed_save_is_described_with_the_space_free_when_it_failed(tmp_path, free_space):
    """The half-written checkpoint is removed, which frees space: the message must say what was free when the
    save failed (here 3 MiB), not after the clean-up (87 MiB, which reads as if the disk were not full)."""
    run_dir = tmp_path / "run"
    complete, partial = run_dir / "checkpoint-2", run_dir / "checkpoint-4"
    complete.mkdir(parents=True)
    (complete / "model.safetensors").write_bytes(b"x")
    checkpoints.mark_complete(complete)
    partial.mkdir()
    (partial / "optimizer.pt").write_bytes(b"half")
    free_space["free"] = lambda path: 3 * MiB if partial.exists() else 87 * MiB
    error = save_failure(torch_short_write(), run_dir, 4)
    assert str(error).startswith(f"Saving checkpoint checkpoint-4 in '{run_dir}' failed: the disk holding "
                                 f"'{run_dir}' is full (3 MiB free).")
    assert "checkpoint-4 was removed" in str(error) and "checkpoint-2, is intact" in str(error)
    assert not partial.exists() and (complete / MARKER).is_file()


def test_the_message_names_the_folder_even_when_free_space_is_unknown(tmp_path, monkeypatch):
    def unavailable(path):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(shutil, "disk_usage", unavailable)
    assert describe_write_error(OSError(errno.ENOSPC, "No space left on device"), Path(tmp_path)) == (
        f"the disk holding '{tmp_path}' is full (free space unknown)")


# ---- a stop signal during an evaluation inside training ----

class SignalDuringEvaluation(TrainerCallback):
    """Sends this process SIGTERM at the second batch of the first evaluation, and counts evaluation batches."""

    def __init__(self) -> None:
        self.batches = 0

    def on_prediction_step(self, args, state, control, **kwargs):
        self.batches += 1
        if self.batches == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # StopOnSignal's handler is installed while train() runs


def tiny_trainer(run_dir: Path, eval_on_start: bool) -> tuple[Trainer, SignalDuringEvaluation]:
    """A 1-layer BERT classifier on random ids: 40 evaluation batches after step 2 (or before step 1)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=2))
    rows = [{"input_ids": torch.randint(0, 50, (8,)).tolist(), "labels": i % 2} for i in range(80)]
    args = TrainingArguments(output_dir=str(run_dir), max_steps=6, per_device_train_batch_size=4,
                             per_device_eval_batch_size=2, eval_strategy="steps", eval_steps=2, save_strategy="no",
                             eval_on_start=eval_on_start, logging_steps=1, report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows))
    attach_run_callbacks(trainer, TrainingConfig(), run_dir)
    sender = SignalDuringEvaluation()
    trainer.add_callback(sender)
    return trainer, sender


def test_a_signal_during_an_evaluation_ends_it_at_the_next_batch_and_saves_the_step(tmp_path):
    run_dir = tmp_path / "run"
    trainer, sender = tiny_trainer(run_dir, eval_on_start=False)
    with pytest.raises(TrainingStopped, match="stopped at step 2; the checkpoint is .*checkpoint-2") as caught:
        train_and_evaluate(trainer, TrainingConfig(), run_dir, None, lambda metrics, prefix: metrics)
    assert caught.value.exit_code == 143
    assert sender.batches == 2  # the evaluation ended at the batch after the signal, not after all 40
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-2"]
    assert why_incomplete(run_dir / "checkpoint-2") is None
    history = trainer.state.log_history
    assert not any(key.startswith("eval_") for entry in history for key in entry)  # no scores from part of it
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers and the patch are undone
    assert "_maybe_log_save_evaluate" not in vars(trainer)


def test_a_signal_during_the_evaluation_before_training_stops_with_nothing_to_save(tmp_path):
    run_dir = tmp_path / "run"
    trainer, sender = tiny_trainer(run_dir, eval_on_start=True)
    with pytest.raises(TrainingStopped, match="before its first step; nothing was trained") as caught:
        train_and_evaluate(trainer, TrainingConfig(), run_dir, None, lambda metrics, prefix: metrics)
    assert caught.value.exit_code == 143 and sender.batches == 2
    assert not list(run_dir.glob("checkpoint-*"))


def test_transformers_still_logs_evaluates_and_saves_in_maybe_log_save_evaluate():
    """Canary for patches/interruptible_evaluation.py: the Trainer reaches evaluation and checkpoint saving during
    training through `self._maybe_log_save_evaluate` (so an instance attribute replaces it), which evaluates before
    it saves, and calls on_prediction_step after every evaluation batch."""
    loop = inspect.getsource(Trainer._run_epoch)
    assert "self._maybe_log_save_evaluate(" in loop
    body = inspect.getsource(Trainer._maybe_log_save_evaluate)
    assert body.index("self._evaluate(") < body.index("self._save_checkpoint(") < body.index("on_save(")
    assert "control.should_evaluate" in body and "control.should_save" in body
    assert "on_prediction_step(" in inspect.getsource(Trainer.evaluation_loop)


# ---- the model card of a model that has no Hub id ----

def card_record(*overrides: str, **extra) -> dict:
    recipe = dataclasses.asdict(load_recipe(None, ["task=sft", "method.type=lora", "data.train_file=train.jsonl", *overrides]))
    return {"recipe": recipe, "versions": {"llmtune": "test"}, **extra}


def test_a_card_for_a_local_base_model_names_it_without_a_link(tmp_path):
    local = tmp_path / "my-base"
    local.mkdir()
    card = render(card_record(f"model.name={local}"), {}, "me/sft", "adapter")
    assert f"starting from the local checkpoint `{local}` (not a Hugging Face Hub model)" in card
    assert "[None]" not in card and "huggingface.co/None" not in card and "base_model:" not in card


def test_a_card_for_a_model_from_scratch_or_an_sft_parent_without_a_base_says_what_is_known():
    scratch = render(card_record("task=pretrain", "model.init=scratch", "method.type=full"), {}, "me/lm", "full")
    assert "This is a model for language modelling, trained from scratch (random initial weights)" in scratch
    assert "license: other" in scratch and "there is no base model whose license applies" in scratch
    parent = {"run_dir": "/runs/sft-1", "task": "sft", "base_name": None}
    dpo = render(card_record("task=dpo", sft_parent=parent), {}, "me/dpo", "adapter")
    assert "starting from an SFT model (llmtune run `sft-1`, task sft), trained" in dpo
    assert "None" not in dpo.split("## How to use")[0]


def test_the_run_folder_gets_llmtunes_card_in_place_of_trls_draft(tmp_path):
    """trl writes README.md into the run folder at every checkpoint; for a model without a Hub id it reads
    'a fine-tuned version of [None](https://huggingface.co/None)'. write_run_card replaces it."""
    local = tmp_path / "my-base"
    local.mkdir()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps(card_record(f"model.name={local}")))
    (run_dir / "adapter_config.json").write_text("{}")
    (run_dir / "README.md").write_text("This model is a fine-tuned version of [None](https://huggingface.co/None).")
    card = write_run_card(run_dir).read_text()
    assert "[None]" not in card and f"the local checkpoint `{local}`" in card and "# run\n" in card
    assert "The run has not finished" in card  # no metrics.json yet
    (run_dir / "metrics.json").write_text(json.dumps({"after": {"loss": 1.25}, "before": {"loss": 2.5}}))
    card = write_run_card(run_dir).read_text()
    assert "| loss | 2.5000 | 1.2500 |" in card and f'PeftModel.from_pretrained(base, "{run_dir.resolve()}")' in card
