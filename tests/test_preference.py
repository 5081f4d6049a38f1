"""Preference tasks end to end on a tiny Llama (SmolLM2's tokenizer and chat template) and real HH-RLHF pairs:
every task trains, evaluates before and after and saves; DPO's reference is the policy with adapters off; padded
batches give each sequence the log-probabilities it has alone; a DPO adapter loads with plain peft (checked on the
dpo run of the first test, to train it once)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NO_REPORT

from llmtune import api
from llmtune.config.loader import load_recipe

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "preference" / "hh-rlhf-harmless-base-test.jsonl.gz"

pytestmark = pytest.mark.slow


@pytest.fixture
def hh_file(tmp_path) -> Path:
    """The first 30 HH pairs (24 train, 6 held out by data.holdout_every=5)."""
    with gzip.open(HH, "rt") as handle:
        lines = [next(handle) for _ in range(30)]
    path = tmp_path / "hh30.jsonl"
    path.write_text("".join(lines))
    return path


def recipe_for(task: str, model: str, data: Path, out: Path, *extra: str):
    return load_recipe(None, [
        f"task={task}", f"model.name={model}", f"data.train_file={data}", "data.holdout_every=5",
        "data.max_length=192", "pref.max_prompt_length=128", "method.type=lora", "training.max_steps=3",
        "training.batch_size=4", "training.eval_batch_size=6", "training.learning_rate=5e-3",
        "training.eval_every=3", "training.precision=fp32", f"output.dir={out}", NO_REPORT, *extra,
    ])


@pytest.mark.parametrize("task, metrics", [
    ("dpo", {"loss", "accuracy", "margin", "chosen_logp", "rejected_logp"}),
    ("kto", {"loss", "margin", "chosen_logp", "rejected_logp", "kl"}),
    ("orpo", {"loss", "accuracy", "margin", "chosen_logp", "rejected_logp"}),
    ("simpo", {"loss", "accuracy", "margin", "chosen_logp", "rejected_logp"}),
    ("reward", {"loss", "accuracy", "margin"}),
])
def test_each_preference_task_trains_evaluates_and_saves_an_adapter(tiny_llama, hh_file, tmp_path, task, metrics):
    out = tmp_path / "run"
    result = api.train(recipe_for(task, tiny_llama, hh_file, out))
    assert set(result["before"]) >= metrics and set(result["after"]) >= metrics
    assert result["after"] != result["before"]  # three steps at a high learning rate move every number
    assert result["train"]["weights_changed"]
    if task == "dpo":  # before training the policy is its reference: every pair ties, a coin flip
        assert result["before"]["margin"] == 0.0 and result["before"]["accuracy"] == 0.5
    record = json.loads((out / "run.json").read_text())
    assert record["format"] == "transcript_pairs"
    paired = task != "kto"
    assert record["rows"] == ({"train": 24, "eval": 6} if paired else {"train": 48, "eval": 12})
    assert json.loads((out / "metrics.json").read_text())["after"] == result["after"]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == ("SEQ_CLS" if task == "reward" else "CAUSAL_LM")
    if task == "dpo":
        assert_plain_peft_loads_the_dpo_adapter(tiny_llama, out)


@pytest.mark.parametrize("task, packs", [("dpo", False), ("kto", False), ("orpo", True)])
def test_tasks_with_a_reference_pass_keep_frozen_weights_unpacked(tiny_llama, hh_file, tmp_path, task, packs):
    """Packing the frozen weights for oneDNN cost DPO time and memory (README, native-bf16 benchmark)."""
    from llmtune.kernels.lora_linear import FusedLoraLinear

    trainer = api.build_trainer(recipe_for(task, tiny_llama, hh_file, tmp_path / "run"))
    fused = [m for m in trainer.model.modules() if isinstance(m, FusedLoraLinear)]
    assert fused and all(m.pack_frozen_weights is packs for m in fused)


def test_dpo_reference_is_the_policy_with_adapters_off_and_padding_changes_no_log_probability(
    tiny_llama, hh_file, tmp_path
):
    trainer = api.build_trainer(recipe_for("dpo", tiny_llama, hh_file, tmp_path / "run"))
    model = trainer.model
    assert list(model.peft_config) == ["default"] and trainer.ref_model is None  # no copy: adapters are turned off
    with torch.no_grad():  # make the adapter matter, so that "adapters off" is a visible difference
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    rows = [trainer.eval_dataset[i] for i in range(4)]
    assert len({len(r["chosen_ids"]) + len(r["prompt_ids"]) for r in rows}) > 1  # the batch really is padded
    collate = trainer.data_collator
    model.eval()
    batched = torch.stack(trainer.compute_ref_log_probs(model, collate(rows)))
    alone = torch.stack([torch.stack(trainer.compute_ref_log_probs(model, collate([r]))).squeeze(1) for r in rows], 1)
    # Sums of a few hundred float32 log-probabilities: 1e-5 per token, i.e. about 1e-6 of the sum
    assert torch.allclose(batched, alone, atol=1e-5, rtol=1e-6), (batched - alone).abs().max()

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()  # the checkpoint itself
    batch = collate(rows[:1])
    with torch.no_grad():
        logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    tokens = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].bool()
    per_token = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    expected = (per_token * mask).sum(-1)  # chosen and rejected of the first pair, by the base model
    assert torch.allclose(batched[:, 0], expected, atol=1e-4, rtol=1e-6)  # float32 sums of ~1,000 in other orders


def assert_plain_peft_loads_the_dpo_adapter(tiny_llama: str, out: Path) -> None:
    """The saved DPO adapter, loaded with plain peft in a fresh process, gives llmtune's log-probabilities."""
    text = "<|im_start|>user\nHow do I make friends?<|im_end|>\n<|im_start|>assistant\nSay hello and listen.<|im_end|>"
    script = f"""
import json, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base = AutoModelForCausalLM.from_pretrained({tiny_llama!r}, dtype=torch.float32)
model = PeftModel.from_pretrained(base, {str(out)!r}).eval()
tok = AutoTokenizer.from_pretrained({str(out)!r})
ids = tok({text!r}, return_tensors="pt").input_ids
with torch.no_grad():
    logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
import sys
assert not [name for name in sys.modules if name.split(".")[0] == "llmtune"], "plain peft must not need llmtune"
print(json.dumps(logps.tolist()))
"""
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    from llmtune.inference.trained import load_trained

    model, tokenizer, _ = load_trained(out)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    base = load_trained(tiny_llama)[0]
    with torch.no_grad():
        before = base(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    theirs = torch.tensor(json.loads(plain.stdout.strip().splitlines()[-1]))
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0)
    assert not torch.allclose(theirs, before, atol=1e-4, rtol=0)  # the adapter carries what DPO trained


@pytest.mark.parametrize("sft_adapter", ["merge", "continue"])
def test_dpo_starts_from_an_sft_run_and_names_it(tiny_llama, hh_file, tmp_path, sft_adapter):
    from llmtune.hub.model_card import render
    from llmtune.inference.trained import load_trained

    sft_data = tmp_path / "sft.jsonl"
    with sft_data.open("w") as handle:
        for line in hh_file.read_text().splitlines()[:12]:
            chosen = json.loads(line)["chosen"]
            prompt, _, reply = chosen.rpartition("\n\nAssistant:")
            handle.write(json.dumps({"prompt": prompt.split("Human:")[-1].strip(), "completion": reply.strip()}) + "\n")
    sft_run = tmp_path / "sft"
    api.train(load_recipe(None, [
        "task=sft", f"model.name={tiny_llama}", f"data.train_file={sft_data}", "method.type=lora",
        "training.max_steps=2", "training.batch_size=4", "training.learning_rate=5e-3", "training.eval_every=no",
        "training.save_every=no", "training.precision=fp32", f"output.dir={sft_run}", "data.max_length=128",
    ]))
    sft_model, tokenizer, _ = load_trained(sft_run)

    out = tmp_path / "dpo"
    recipe = recipe_for("dpo", str(sft_run), hh_file, out, f"pref.sft_adapter={sft_adapter}")
    trainer = api.build_trainer(recipe)
    # training starts from the SFT model: same outputs before any DPO step
    ids = tokenizer("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = sft_model(input_ids=ids).logits
        trainer.model.eval()
        actual = trainer.model(input_ids=ids).logits
    assert torch.allclose(expected, actual, atol=1e-4, rtol=0)
    if sft_adapter == "continue":
        assert "ref" in trainer.model.peft_config  # the reference is the SFT adapter's frozen starting copy

    result = api.train(recipe)
    assert result["after"]["accuracy"] >= 0
    assert not (out / "ref").exists()  # only the trained adapter is saved, not trl's reference copy
    record = json.loads((out / "run.json").read_text())
    assert record["sft_parent"]["run_dir"] == str(sft_run) and record["sft_parent"]["adapter"]
    card = render(record, result, "me/dpo", "adapter")
    assert "an SFT model (llmtune run `sft`, task sft)" in card
    reloaded, _, _ = load_trained(out)
    with torch.no_grad():
        after = reloaded(input_ids=ids).logits
    assert not torch.allclose(after, expected, atol=1e-4, rtol=0)  # DPO changed the SFT model


def test_qlora_dpo_keeps_learning_on_a_4bit_base_as_on_a_bf16_cpu(tiny_llama, hh_file, tmp_path, bnb_avx512bf16):
    """The 4-bit trap (../shared/STACK-NOTES.md): bitsandbytes on an avx512_bf16 CPU repacks 4-bit weights at the
    first evaluation, after which they stop taking part in training. DPO evaluates before training, so the
    adapter must still move between every pair of checkpoints."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result = api.train(recipe_for("dpo", tiny_llama, hh_file, out, "method.quantization=4bit",
                                  "method.quant_type=fp4", "method.double_quant=false", "training.save_every=1",
                                  "training.keep_checkpoints=3"))
    adapters = [load_file(out / f"checkpoint-{step}" / "adapter_model.safetensors") for step in (1, 2, 3)]
    for earlier, later in zip(adapters, adapters[1:]):
        assert any(not torch.equal(earlier[k], later[k]) for k in earlier), "the adapter stopped changing"
    assert result["after"]["margin"] != result["before"]["margin"]
    assert json.loads((out / "run.json").read_text())["recipe"]["method"]["quantization"] == "4bit"


def test_a_reward_model_can_be_an_encoder_reading_prompt_and_reply_as_a_sentence_pair(tiny_bert, hh_file, tmp_path):
    out = tmp_path / "run"
    short = ("method.type=full", "data.max_length=128", "pref.max_prompt_length=96")
    trainer = api.build_trainer(recipe_for("reward", tiny_bert, hh_file, out, *short))
    tokenizer = trainer.processing_class
    row = trainer.train_dataset[0]
    assert tokenizer.sep_token_id in row["chosen_ids"][:-1]  # [CLS] prompt [SEP] reply [SEP]
    assert len(row["chosen_ids"]) <= 128 and row["chosen_ids"][0] == tokenizer.cls_token_id
    assert trainer.model.config.num_labels == 1
    result = api.train(recipe_for("reward", tiny_bert, hh_file, out, *short, "output.overwrite=true"))
    assert {"accuracy", "margin"} <= set(result["after"])


@pytest.mark.parametrize("precompute", ["off", "on"])
def test_full_fine_tuning_dpo_keeps_a_frozen_reference_or_precomputes_it(tiny_llama, hh_file, tmp_path, precompute):
    out = tmp_path / "run"
    extra = ("method.type=full", f"pref.precompute_reference={precompute}", "training.learning_rate=1e-4")
    trainer = api.build_trainer(recipe_for("dpo", tiny_llama, hh_file, out, *extra))
    if precompute == "off":
        reference = trainer.ref_model
        assert reference is not None and reference is not trainer.model
        assert not any(p.requires_grad for p in reference.parameters())
    else:
        assert trainer.ref_model is None and trainer.precompute_ref_logps
    result = api.train(recipe_for("dpo", tiny_llama, hh_file, out, *extra))
    assert result["after"]["margin"] != 0 and result["train"]["weights_changed"]


def test_dpo_and_kto_under_fsdp_on_a_torch_that_breaks_the_fused_head_are_refused_with_the_way_out(
        tiny_llama, hh_file, tmp_path, monkeypatch):
    """trl's DPO/KTO head breaks FSDP2 on torch < 2.13 (tests/test_patches.py::test_fsdp2_gate_...): say so before
    training rather than fail at the first step after a checkpoint save."""
    from llmtune.errors import LlmtuneError
    from llmtune.tasks import preference_trainers

    monkeypatch.setattr(preference_trainers, "launched_with", lambda mode: mode == "FSDP")
    monkeypatch.setattr(preference_trainers, "fused_head_breaks_fsdp2", lambda: True)
    for task in ("dpo", "kto"):
        with pytest.raises(LlmtuneError, match=rf"{task.upper()} under FSDP needs torch >= 2\.13.*--accelerate multi_gpu"):
            api.build_trainer(recipe_for(task, tiny_llama, hh_file, tmp_path / task))
    # SimPO's trainer calls the model's own output head, so the same launch is fine for it
    assert api.build_trainer(recipe_for("simpo", tiny_llama, hh_file, tmp_path / "simpo")) is not None
