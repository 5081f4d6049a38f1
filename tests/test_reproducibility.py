"""training.seed decides everything random in a run: two runs of the same recipe start from bit-identical weights
and end with identical metrics on a CPU; another seed gives other weights and other numbers."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, write_jsonl

from llmtune import build_trainer, load_recipe, train

SHAKESPEARE = ("From fairest creatures we desire increase, that thereby beauty's rose might never die, "
               "but as the riper should by time decease, his tender heir might bear his memory.\n") * 40
TIMING = ("runtime", "per_second", "preparation_time")


def recipes(kind: str, tiny_bert: str, tiny_llama: str, files: dict, tmp_path) -> list[str]:
    """Overrides for a tiny recipe of each kind: classification LoRA, SFT LoRA, pretraining from scratch."""
    common = ["training.max_steps=3", "training.batch_size=4", "training.save_every=no", "training.eval_every=3",
              "training.learning_rate=1e-2", "data.validation_fraction=0.25"]
    if kind == "classification_lora":
        return [f"model.name={tiny_bert}", f"data.train_file={files['train']}", "data.eval_file=null",
                "data.test_file=null", "method.type=lora", "method.target_modules=[query, value]", *common]
    if kind == "sft_lora":
        chats = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(16)]
        data = write_jsonl(tmp_path / "chats.jsonl", chats)
        return ["task=sft", f"model.name={tiny_llama}", f"data.train_file={data}", "data.eval_file=null",
                "data.test_file=null", "data.max_length=64", "method.type=lora", *common]
    text = tmp_path / "text.txt"
    text.write_text(SHAKESPEARE)
    return ["task=pretrain", "model.init=scratch", f"data.train_file={text}", "data.eval_file=null",
            "data.test_file=null", "data.max_length=32", "scratch.layers=1", "scratch.hidden_size=32",
            "scratch.heads=2", "scratch.vocab_size=300", "scratch.context_length=32", *common]


def initial_weights(overrides: list[str], run_dir, seed: int) -> dict[str, torch.Tensor]:
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [*overrides, f"training.seed={seed}",
                                                                  f"output.dir={run_dir}"])
    return {k: v.detach().clone() for k, v in build_trainer(recipe).model.state_dict().items()}


def final_metrics(overrides: list[str], run_dir, seed: int) -> dict:
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [*overrides, f"training.seed={seed}",
                                                                  f"output.dir={run_dir}"])
    metrics = train(recipe)
    return {section: {k: v for k, v in values.items() if not k.endswith(TIMING)}
            for section, values in metrics.items() if section in ("before", "train", "after")}


KINDS = ("classification_lora", "sft_lora", "pretrain_scratch")


def three_runs(what, kind: str, tiny_bert, tiny_llama, files, tmp_path) -> list:
    """`what` (initial weights or final metrics) of seed 7 twice, then seed 8."""
    overrides = recipes(kind, tiny_bert, tiny_llama, files, tmp_path)
    return [what(overrides, tmp_path / name, seed) for name, seed in (("a", 7), ("b", 7), ("c", 8))]


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_initial_weights_other_seed_other_weights(tiny_bert, tiny_llama, reviews_files, tmp_path, kind):
    first, second, other = three_runs(initial_weights, kind, tiny_bert, tiny_llama, reviews_files, tmp_path)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), "same seed, different initial weights"
    assert not all(torch.equal(first[k], other[k]) for k in first), "another seed, same initial weights"


@pytest.mark.slow  # three training runs per kind
@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_metrics_other_seed_other_metrics(tiny_bert, tiny_llama, reviews_files, tmp_path, kind):
    run_a, run_b, run_c = three_runs(final_metrics, kind, tiny_bert, tiny_llama, reviews_files, tmp_path)
    assert run_a == run_b, "same seed, different metrics"
    assert run_a["after"]["loss"] != run_c["after"]["loss"], "another seed, same final loss"
