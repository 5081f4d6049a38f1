"""Causal-LM correctness on a tiny Llama: loss masks, packing, gradient accumulation, end-of-turn and eos."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import NO_REPORT, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from llmtune import build_trainer, load_recipe, train
from llmtune.cli import main
from llmtune.data.lm_tokenize import tokenize_conversation, tokenize_conversation_batch
from llmtune.kernels.attention import SDPA_VARLEN

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, of course."},
]


def chats(n: int) -> list[dict]:
    """Multi-turn chats of different lengths (so padding differs between batches)."""
    out = []
    for i in range(n):
        turns = [{"role": "user", "content": f"Question {i}: " + "tell me more " * (i % 5 + 1)},
                 {"role": "assistant", "content": "Answer " + "indeed " * (i % 7 + 1)}]
        if i % 2:
            turns += [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because " * (i % 3 + 1)}]
        out.append({"messages": turns})
    return out


def sft_recipe(model: str, train_file, tmp_path, *extra: str):
    return load_recipe({"task": "sft", "model": {"name": model}, "data": {"train_file": str(train_file)},
                        "output": {"dir": str(tmp_path / "run"), "report": False}}, ["training.max_steps=1", *extra])


def test_only_assistant_turns_are_trained_in_a_multi_turn_chat(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    out = tokenize_conversation(CHAT, tokenizer, "assistant", 1024)
    ids, mask = out["input_ids"], out["assistant_masks"]
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    masked = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert trained == "Four.<|im_end|>\nSix, of course.<|im_end|>\n"
    for text in ("You answer briefly.", "What is two plus two?", "And three plus three?", "<|im_start|>assistant\n"):
        assert text in masked
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)  # nothing lost or added


def test_trainer_labels_are_minus_100_exactly_on_prompt_tokens(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    trainer = build_trainer(sft_recipe(tiny_llama, data, tmp_path, "lm.packing=false"))
    row = trainer.train_dataset[0]
    tokenizer = trainer.processing_class
    expected = tokenize_conversation(CHAT, tokenizer, "assistant", 1024)
    assert row["input_ids"] == expected["input_ids"]
    assert [label != -100 for label in row["labels"]] == [bool(m) for m in expected["assistant_masks"]]
    assert all(label == tok for label, tok in zip(row["labels"], row["input_ids"]) if label != -100)


def test_loss_on_all_trains_every_token(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert all(tokenize_conversation(CHAT, tokenizer, "all", 1024)["assistant_masks"])


def test_batched_tokenization_keeps_every_conversation_its_own_tokens(tiny_llama):
    """The dataset is tokenized in batches (one tokenizer call per batch); each row must get exactly what it gets
    alone - pieces must not shift between rows - including a truncated row and one trained on all tokens."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    conversations = [CHAT, *(row["messages"] for row in chats(5))]
    for loss_on, max_length in (("assistant", 1024), ("assistant", 20), ("all", 30)):
        batch = tokenize_conversation_batch(conversations, tokenizer, loss_on, max_length)
        alone = [tokenize_conversation(c, tokenizer, loss_on, max_length) for c in conversations]
        assert batch["input_ids"] == [a["input_ids"] for a in alone]
        assert batch["assistant_masks"] == [a["assistant_masks"] for a in alone]
        assert batch["truncated"] == [a["truncated"] for a in alone]
    assert any(tokenize_conversation_batch(conversations, tokenizer, "assistant", 20)["truncated"])


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every trained token, in reading order (labels shifted as the model does)."""
    logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    keep = labels != -100
    return torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="none")


@pytest.mark.parametrize("attention", ["sdpa", SDPA_VARLEN])
def test_packed_batch_gives_the_same_loss_as_unpacked(tiny_llama, attention):
    """Tolerance: 1e-5 on the loss, 1e-4 per token (fp32). The control - no position reset - must differ."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attention).eval()
    samples = []
    for row in chats(4):
        encoded = tokenize_conversation(row["messages"], tokenizer, "assistant", 512)
        samples.append({"input_ids": encoded["input_ids"],
                        "labels": [t if m else -100 for t, m in zip(encoded["input_ids"], encoded["assistant_masks"])]})
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(samples)
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(samples)
    assert padded["input_ids"].shape[0] == 4 and packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache, transformers does not detect packed sequences.
        unpacked = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False)
        packed_out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False)
        leaky = model(input_ids=packed["input_ids"], use_cache=False)  # one long sequence, attending across samples
    reference = token_losses(unpacked.logits, padded["labels"])
    ours = token_losses(packed_out.logits, packed["labels"])
    control = token_losses(leaky.logits, packed["labels"])
    assert ours.shape == reference.shape
    assert ours.mean().item() == pytest.approx(reference.mean().item(), abs=1e-5)
    assert (ours - reference).abs().max().item() < 1e-4
    assert (control - reference).abs().max().item() > 1e-3


@pytest.mark.parametrize("padding_free", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_loss_and_update_do_not_depend_on_gradient_accumulation(tiny_llama, tmp_path, padding_free):
    """Same global batch (4) as 4x1 and 2x2: SGD step and logged loss agree (per-token normalised loss)."""
    data = write_jsonl(tmp_path / "chats.jsonl", chats(8))
    results = []
    for batch, accumulation in ((4, 1), (2, 2)):
        trainer = build_trainer(sft_recipe(
            tiny_llama, data, tmp_path / f"b{batch}", f"lm.padding_free={padding_free}", "training.optimizer=sgd",
            "training.learning_rate=0.5", f"training.batch_size={batch}", f"training.gradient_accumulation={accumulation}",
            "training.max_grad_norm=0", "training.log_every=1", "training.eval_every=no", "training.save_every=no",
            "training.precision=fp32",  # an equality to 1e-6: bf16 autocast would round both ways differently
        ))
        trainer.train()
        results.append(({n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                         trainer.state.log_history[0]["loss"]))
    (params_a, loss_a), (params_b, loss_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    moved = max((params_a[n] - params_b[n]).abs().max().item() for n in params_a)
    assert moved < 1e-6


def test_sft_run_saves_eos_equal_to_end_of_turn_and_generations(tiny_llama, alpaca_files, tmp_path, capsys):
    recipe = load_recipe("recipes/smollm2_alpaca_lora.yaml", [
        f"model.name={tiny_llama}", "data.dataset=null", f"data.train_file={alpaca_files['train']}",
        f"data.eval_file={alpaca_files['eval']}", "data.eval_split=null", "data.validation_fraction=0", "data.max_length=128",
        "training.max_steps=2", "lm.max_new_tokens=4", "lm.packing=true", f"output.dir={tmp_path / 'run'}", NO_REPORT,
    ])
    metrics = train(recipe)
    run_dir = tmp_path / "run"
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    generation = json.loads((run_dir / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert (eos[0] if isinstance(eos, list) else eos) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert {"loss", "perplexity", "token_accuracy"} <= set(metrics["after"])
    assert metrics["data"]["train"]["samples"] == 48 and 0 < metrics["data"]["train"]["packing_efficiency"] <= 1
    logged = [json.loads(x) for x in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert {r["step"] for r in logged} >= {0, 2} and all("completion" in r for r in logged)

    capsys.readouterr()
    assert main(["generate", str(run_dir), "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["prompt"] == "Hi" and record["new_tokens"] <= 3


def test_base_tokenizer_without_template_or_pad_gets_chatml_and_a_pad(tmp_path, caplog):
    """A base model whose tokenizer has no chat template, no pad token and no ChatML tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["hello world, how are you? fine thanks."] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    base = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=512)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 4)
    recipe = load_recipe({"task": "sft", "model": {"name": str(base)}, "data": {"train_file": str(data), "max_length": 512},
                          "output": {"dir": str(tmp_path / "run"), "report": False}}, ["training.max_steps=1"])
    with caplog.at_level("INFO"):
        train(recipe)
    assert "no pad token" in caplog.text and "no chat template; using ChatML" in caplog.text
    saved = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert saved.pad_token == "<eos>" and "<|im_start|>" in saved.chat_template
    end_of_turn = saved.convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((tmp_path / "run" / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == end_of_turn
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run").get_input_embeddings().num_embeddings == len(saved)


def test_data_preview_marks_trained_tokens_and_reports_statistics(tiny_llama, alpaca_files, capsys):
    assert main(["data", "preview", "recipes/smollm2_alpaca_lora.yaml", f"model.name={tiny_llama}", "data.dataset=null",
                 f"data.train_file={alpaca_files['train']}", "data.eval_split=null", "data.validation_fraction=0",
                 "data.max_length=96", "lm.packing=true",
                 "-n", "2", "--no-colour"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and "[[" in out and "]]" in out
    first = out.split("--- sample 0")[1].split("--- sample 1")[0]
    assert "<|im_start|>user" in first.split("[[")[0]  # the prompt comes before the first trained span, unmarked
    for stat in ("samples: 48", "truncation_rate:", "packing_efficiency:", "trained_tokens:"):
        assert stat in out


def test_mixture_weights_scale_each_source_and_group_by_length(tiny_llama, tmp_path):
    from llmtune import validate

    main_file = write_jsonl(tmp_path / "main.jsonl", chats(4))
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)])
    for weight, expected in ((0.5, 6), (2, 12)):
        recipe = sft_recipe(tiny_llama, main_file, tmp_path, "lm.padding_free=false",
                            f"data.mixture=[{{train_file: {extra}, weight: {weight}, format: prompt_completion}}]")
        assert validate(recipe)["tokens"]["train"]["samples"] == expected
    trainer = build_trainer(recipe)
    assert trainer.args.train_sampling_strategy == "group_by_length"


def test_llama_from_scratch_builds_and_runs():
    from llmtune.config.schema import ScratchConfig
    from llmtune.models.scratch import build_model, train_tokenizer

    tokenizer = train_tokenizer(iter(["to be or not to be, that is the question"] * 50), vocab_size=300)
    model = build_model(ScratchConfig(architecture="llama", layers=1, hidden_size=32, heads=2), tokenizer)
    ids = tokenizer("to be or not", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") != tokenizer.unk_token_id


@pytest.mark.slow  # a real process
def test_chat_command_answers_until_an_empty_line(tiny_llama, tmp_path):
    from conftest import REPO, run_cli

    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    train(sft_recipe(tiny_llama, data, tmp_path))
    result = run_cli("chat", str(tmp_path / "run"), "--max-new-tokens", "3", input="Hello there\n\n", cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("model>") == 1 and "you>" in result.stdout


@pytest.mark.slow  # two trainings and trl's own loss (~5 s)
def test_scoring_only_labelled_positions_matches_trl_loss_gradient_and_accuracy(tiny_llama, tmp_path):
    """llmtune projects only labelled positions through the LM head off CUDA, with a frozen head in blocks whose
    gradient is made in the forward pass (`head_cross_entropy`); trl scores every position. Same loss (1e-5), same
    LoRA gradients (1e-5 relative) and same token accuracy for both of llmtune's ways, on a padding-free batch and
    on a padded one of several rows (positions labelled in one row only are kept for all rows)."""
    data = write_jsonl(tmp_path / "chats.jsonl", chats(6))
    trainer = build_trainer(sft_recipe(tiny_llama, data, tmp_path, "method.type=lora", "training.batch_size=6"))
    assert trainer.labelled_logits_only and trainer.head_in_blocks
    assert trainer.model.config._attn_implementation == SDPA_VARLEN
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(6)]))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one row, no padding
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    assert_three_ways_agree(trainer, batch)
    padded = build_trainer(sft_recipe(tiny_llama, data, tmp_path / "padded", "method.type=lora",
                                      "training.batch_size=6", "lm.padding_free=false"))
    batch = padded._prepare_inputs(padded.data_collator([padded.train_dataset[i] for i in range(6)]))
    assert batch["input_ids"].shape[0] == 6 and (batch["attention_mask"] == 0).any()
    assert_three_ways_agree(padded, batch)
    # A trained head needs its own gradient, which the blocks do not make: full fine-tuning keeps the logits path.
    full = build_trainer(sft_recipe(tiny_llama, data, tmp_path / "full", "method.type=full", "training.batch_size=6"))
    assert full.labelled_logits_only and not full.head_in_blocks
    full.compute_loss(full.model, dict(batch), num_items_in_batch=None).backward()
    assert full.model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_scoring_in_blocks_casts_the_frozen_head_once_not_every_step(tiny_llama, tmp_path):
    """Under bf16 autocast the head weight (vocabulary x hidden) is cast to bf16 once and reused: the model's own
    head call is skipped, since autocast would cast the whole weight again in every step even for zero positions."""
    from torch.utils._python_dispatch import TorchDispatchMode

    data = write_jsonl(tmp_path / "chats.jsonl", chats(4))
    trainer = build_trainer(sft_recipe(tiny_llama, data, tmp_path, "method.type=lora", "training.batch_size=4"))
    assert trainer.head_in_blocks
    head = trainer.model.get_output_embeddings()
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    casts = []

    class CountHeadCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].shape == head.weight.shape:
                casts.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    losses = []
    with CountHeadCasts():
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=None)
            loss.backward()
            losses.append(loss.item())
    assert casts == [torch.float32], casts  # the one cached cast, in the first step
    assert losses[0] == losses[1] == losses[2] and losses[0] > 0
    assert "forward" not in head.__dict__  # the head's own forward is back


def assert_three_ways_agree(trainer, batch: dict) -> None:
    results = {}
    for way, labelled_only, in_blocks in (("blocks", True, True), ("labelled", True, False), ("trl", False, False)):
        trainer.labelled_logits_only, trainer.head_in_blocks = labelled_only, in_blocks
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=None)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        logs: dict = {}
        trainer.log(logs)
        results[way] = (loss.item(), grads, trainer.state.log_history[-1]["mean_token_accuracy"])
    loss_trl, grads_trl, acc_trl = results["trl"]
    for way in ("blocks", "labelled"):
        loss_ours, grads_ours, acc_ours = results[way]
        assert loss_ours == pytest.approx(loss_trl, abs=1e-5), way
        assert grads_ours.keys() == grads_trl.keys() and grads_ours
        for name in grads_ours:
            scale = grads_trl[name].abs().max().item() + 1e-12
            assert (grads_ours[name] - grads_trl[name]).abs().max().item() / scale < 1e-5, (way, name)
        assert acc_ours == pytest.approx(acc_trl, abs=1e-6), way


def test_tokenized_cache_keys_change_with_every_setting_and_the_tokenizer(tiny_llama, tmp_path):
    """llmtune names tokenized datasets itself (cheap keys instead of pickling the tokenizer); a changed setting,
    template or tokenizer must give a new key, or a stale cache would be read."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from llmtune.data.fingerprint import derived_fingerprint

    rows = Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]})
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    key = derived_fingerprint(rows, "conversations", "llmtune/data/lm_tokenize.py", tokenizer, max_length=64)
    assert key == derived_fingerprint(rows, "conversations", "llmtune/data/lm_tokenize.py", tokenizer, max_length=64)
    assert key != derived_fingerprint(rows, "conversations", "llmtune/data/lm_tokenize.py", tokenizer, max_length=32)
    assert key != derived_fingerprint(rows.select([0, 0]), "conversations", "llmtune/data/lm_tokenize.py", tokenizer,
                                      max_length=64)
    other = AutoTokenizer.from_pretrained(tiny_llama)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert key != derived_fingerprint(rows, "conversations", "llmtune/data/lm_tokenize.py", other, max_length=64)


@pytest.mark.slow  # several tokenizations and trainings (~3 s)
def test_a_second_run_reuses_the_tokenized_splits_and_any_change_tokenizes_again(tiny_llama, tmp_path, monkeypatch):
    """The finished splits are reused (memory-mapped, nothing tokenized) when data, tokenizer and settings are the
    same; a changed setting, data file or tokenizer file tokenizes again into a new entry."""
    import shutil

    from llmtune.data import lm_data
    from llmtune.tasks import causal_lm

    monkeypatch.setenv("LLMTUNE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "chats.jsonl", chats(24))
    calls = []
    tokenize = lm_data.tokenize_splits
    monkeypatch.setattr(causal_lm, "tokenize_splits", lambda *a: calls.append(1) or tokenize(*a))

    def prepared(model: str = tiny_llama, *extra: str):
        recipe = sft_recipe(model, data, tmp_path, "data.max_length=64", "data.validation_fraction=0.25", *extra)
        return causal_lm.prepare_data(recipe, model)[2]

    first = prepared()
    again = prepared()
    assert len(calls) == 1  # the second run tokenized nothing
    for split in ("train", "eval"):
        assert again.splits[split].to_list() == first.splits[split].to_list() and again.splits[split].cache_files
    assert again.stats == first.stats and (again.fmt, again.loss_on) == (first.fmt, first.loss_on)

    longest = max(len(r) for r in first.splits["train"]["input_ids"])
    shorter = prepared(tiny_llama, f"data.max_length={longest - 1}")
    assert len(calls) == 2 and max(len(r) for r in shorter.splits["train"]["input_ids"]) == longest - 1

    prepared(tiny_llama, "lm.loss_on=all")
    assert len(calls) == 3

    write_jsonl(data, chats(25))
    prepared()
    assert len(calls) == 4

    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_llama, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    prepared(str(other))
    assert len(calls) == 5
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 5  # one entry each, no staging leftovers


def test_a_run_on_cached_tokens_still_warns_about_the_rows_its_data_lost(tiny_llama, tmp_path, monkeypatch, caplog):
    """Rows dropped at the first tokenization (an empty reply; a sample truncation left without a trained token)
    are counted in the token statistics and said again by a run that reuses the cached splits."""
    from llmtune.tasks import causal_lm

    monkeypatch.setenv("LLMTUNE_CACHE", str(tmp_path / "cache"))
    rows = chats(12)
    rows[3]["messages"][1]["content"] = "  "  # an empty reply
    rows[5]["messages"] = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "Yes."}]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    recipe = sft_recipe(tiny_llama, data, tmp_path, "data.max_length=64", "data.validation_fraction=0")
    first = causal_lm.prepare_data(recipe, tiny_llama)[2]
    stats = first.stats["train"]
    assert (stats["dropped_empty_turn"], stats["dropped_no_trained_tokens"], stats["samples"]) == (1, 1, 11)
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = causal_lm.prepare_data(recipe, tiny_llama)[2]
    assert again.splits["train"].cache_files and again.stats == first.stats
    assert "1 conversations with an empty turn and 1 samples with no trained token" in caplog.text


def test_recipes_whose_inputs_are_not_local_files_skip_the_tokenized_cache(tiny_llama, tmp_path):
    from llmtune.data.tokenized_cache import cache_key

    data = write_jsonl(tmp_path / "chats.jsonl", chats(4))
    assert cache_key(sft_recipe(tiny_llama, data, tmp_path), tiny_llama)
    assert cache_key(sft_recipe(tiny_llama, data, tmp_path), "HuggingFaceTB/SmolLM2-135M-Instruct") is None
    hub_data = load_recipe({"task": "sft", "model": {"name": tiny_llama}, "data": {"dataset": "tatsu-lab/alpaca"},
                            "output": {"dir": str(tmp_path / "run")}})
    assert cache_key(hub_data, tiny_llama) is None


def test_a_missing_data_file_is_named_and_an_unwritable_cache_only_warns(tiny_llama, tmp_path, monkeypatch, caplog):
    """The cache key never reads a missing file itself (the loader names it), and a cache that cannot be written
    (a full disk) is a warning: this run trains anyway, the next one tokenizes again."""
    from llmtune.data import tokenized_cache
    from llmtune.errors import LlmtuneError
    from llmtune.tasks import causal_lm

    monkeypatch.setenv("LLMTUNE_CACHE", str(tmp_path / "cache"))
    missing = sft_recipe(tiny_llama, tmp_path / "nowhere.jsonl", tmp_path)
    with pytest.raises(LlmtuneError, match="nowhere.jsonl"):
        causal_lm.prepare_data(missing, tiny_llama)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokenized_cache, "_write", full_disk)
    data = write_jsonl(tmp_path / "chats.jsonl", chats(8))
    prepared = causal_lm.prepare_data(sft_recipe(tiny_llama, data, tmp_path, "data.max_length=64"), tiny_llama)[2]
    assert len(prepared.splits["train"]) > 0
    assert "Could not cache the tokenized data" in caplog.text and "No space left" in caplog.text
