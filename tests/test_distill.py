"""Compression: the distillation loss, task distill end to end, and layer pruning that leaves a plain checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, write_reviews
from test_classification import recipe_for

from llmtune import load_recipe, train, validate
from llmtune.errors import LlmtuneError


def test_distillation_loss_equals_the_hand_computed_value():
    from llmtune.tasks.distillation import distillation_loss

    student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    teacher = torch.tensor([[3.0, 1.0, 0.0], [-1.0, 2.0, 1.0]])
    labels = torch.tensor([0, 2])
    alpha, t = 0.7, 2.0

    def softmax(row, temperature):
        exps = [math.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    kl = ce = 0.0
    for s_row, t_row, label in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        p_t, p_s = softmax(t_row, t), softmax(s_row, t)
        kl += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
        ce += -math.log(softmax(s_row, 1.0)[label])
    expected = alpha * t * t * kl / 2 + (1 - alpha) * ce / 2
    got = distillation_loss(student, teacher, labels, alpha, t).item()
    assert got == pytest.approx(expected, rel=1e-6)
    # alpha 0 is plain cross-entropy; a student equal to its teacher has no distillation term.
    assert distillation_loss(student, teacher, labels, 0.0, t).item() == pytest.approx(ce / 2, rel=1e-6)
    assert distillation_loss(teacher, teacher, labels, 1.0, t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def reviews_files(tmp_path_factory) -> dict:
    """conftest's files, written once for this module: the teacher trains on them."""
    return write_reviews(tmp_path_factory.mktemp("reviews"))


@pytest.fixture(scope="module")
def teacher(tiny_bert, reviews_files, tmp_path_factory):
    """One trained classifier run, the teacher of every test here (they only read it)."""
    folder = tmp_path_factory.mktemp("distill") / "teacher"
    train(recipe_for(tiny_bert, reviews_files, folder, "data.test_file=null"))
    return folder


def test_distill_run_learns_from_a_teacher_run_and_prunes_to_a_plain_checkpoint(tiny_bert, reviews_files, teacher, tmp_path):
    from transformers import AutoModelForSequenceClassification

    student = tmp_path / "student"
    metrics = train(recipe_for(tiny_bert, reviews_files, student, "task=distill", f"distill.teacher={teacher}",
                               f"model.name={teacher}", "model.keep_layers=[1]", "distill.alpha=0.8"))
    teacher_metrics = json.loads((teacher / "metrics.json").read_text())
    assert metrics["teacher"]["accuracy"] == pytest.approx(teacher_metrics["after"]["accuracy"], abs=1e-6)
    assert (student / "predictions.jsonl").is_file() and "eval_details" in metrics
    record = json.loads((student / "run.json").read_text())
    assert record["teacher"]["path"] == str(teacher) and record["labels"] == ["negative", "positive"]
    # The student is an ordinary 1-block BERT classifier: plain transformers loads it and scores as the run did.
    plain = AutoModelForSequenceClassification.from_pretrained(student).eval()
    assert plain.config.num_hidden_layers == 1 and len(plain.bert.encoder.layer) == 1
    from llmtune.inference.classifier import Classifier

    ours = Classifier.load(student, precision="fp32")  # the run's own may be bf16 (CPUs with avx512_bf16)
    batch = ours.tokenizer(["a fine chair", "it broke in a day"], padding=True, return_tensors="pt")
    assert torch.allclose(plain(**batch).logits, torch.from_numpy(ours.logits(["a fine chair", "it broke in a day"])),
                          atol=1e-5)
    # The teacher's logits were computed once and cached: a second student reads them back without the teacher.
    from llmtune.data.loading import load_file
    from llmtune.tasks.distill import load_teacher, teacher_logits

    rows = load_file(str(reviews_files["train"]), "data.train_file")
    data = load_recipe(REPO / "recipes" / "quickstart.yaml").data
    first = teacher_logits(load_teacher(str(teacher)), rows, data, str(teacher))
    again = load_teacher(str(teacher))
    again.logits = lambda *args, **kwargs: pytest.fail("the teacher ran again instead of the cache being read")
    assert teacher_logits(again, rows, data, str(teacher))["teacher_logits"] == first["teacher_logits"]


def test_distill_bad_input_is_refused_before_anything_is_written(tiny_bert, reviews_files, teacher, tmp_path):
    relabelled = tmp_path / "other.jsonl"
    relabelled.write_text(reviews_files["train"].read_text().replace('"positive"', '"good"').replace('"negative"', '"bad"'))
    never = tmp_path / "never"
    cases = {
        "labels differ": ([f"distill.teacher={teacher}", f"data.train_file={relabelled}", "data.eval_file=null",
                           "data.test_file=null"], "predicts the labels"),
        "no teacher": ([], "needs 'distill.teacher'"),
        "missing teacher": ([f"distill.teacher={tmp_path / 'nope'}"], "not a folder"),
        "alpha": ([f"distill.teacher={teacher}", "distill.alpha=1.5"], "alpha"),
        "layers out of range": ([f"distill.teacher={teacher}", "model.keep_layers=[0, 7]"], "numbered 0 to 1"),
    }
    for name, (extra, message) in cases.items():
        with pytest.raises(LlmtuneError, match=message):
            recipe = recipe_for(tiny_bert, reviews_files, never, "task=distill", *extra)
            if name == "layers out of range":
                train(recipe)
            else:
                validate(recipe)
        assert not never.exists(), name
    with pytest.raises(LlmtuneError, match="Prune in a full run"):
        recipe_for(tiny_bert, reviews_files, never, "model.num_layers=1", "method.type=lora")
    with pytest.raises(LlmtuneError, match="only task distill"):
        recipe_for(tiny_bert, reviews_files, never, f"distill.teacher={teacher}")


def test_a_transfer_file_adds_unlabelled_rows_the_teacher_alone_teaches(tiny_bert, reviews_files, teacher, tmp_path):
    transfer = tmp_path / "transfer.jsonl"  # texts only; a label column would be ignored
    transfer.write_text("".join(json.dumps({"text": f"review number {i}: it was {w}"}) + "\n"
                                for i, w in enumerate(["fine", "awful", "great", "poor"] * 5)))
    student = tmp_path / "student"
    train(recipe_for(tiny_bert, reviews_files, student, "task=distill", f"distill.teacher={teacher}",
                     f"distill.transfer_file={transfer}", "data.test_file=null", "training.max_steps=3"))
    record = json.loads((student / "run.json").read_text())
    labelled = len(reviews_files["train"].read_text().splitlines())
    assert record["labelled_train_rows"] == labelled and record["data_sizes"]["train"] == labelled + 20
    # A batch of transfer rows alone has no cross-entropy term: only the teacher's.
    from llmtune.tasks.distillation import distillation_loss

    student_logits, teacher_logits = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 2.0]])
    unlabelled = distillation_loss(student_logits, teacher_logits, torch.tensor([-1]), 0.5, 2.0)
    assert unlabelled.item() == pytest.approx(distillation_loss(student_logits, teacher_logits, torch.tensor([0]),
                                                                1.0, 2.0).item() * 0.5, rel=1e-6)
