"""From zero: train a BPE tokenizer and a tiny GPT on Tiny Shakespeare, beat a unigram baseline, then SFT it."""

from __future__ import annotations

import collections
import json
import math

import pytest
from conftest import SHARED_DATA, require_shared, write_jsonl
from transformers import AutoTokenizer

from llmtune import load_recipe, train

pytestmark = pytest.mark.slow  # trains or loads a real checkpoint on real data


def unigram_cross_entropy(tokenizer, train_text: str, eval_text: str) -> float:
    """Cross-entropy (nats/token) of the eval text under the training text's add-one-smoothed unigram distribution."""
    counts = collections.Counter(tokenizer(train_text, add_special_tokens=False).input_ids)
    total, vocab = sum(counts.values()), len(tokenizer)
    ids = tokenizer(eval_text, add_special_tokens=False).input_ids
    return -sum(math.log((counts[i] + 1) / (total + vocab)) for i in ids) / len(ids)


def test_tiny_gpt_from_scratch_beats_unigram_then_takes_sft(tmp_path):
    source = require_shared(SHARED_DATA / "tinyshakespeare" / "input.txt")
    text = source.read_text()
    train_file, eval_file = tmp_path / "train.txt", tmp_path / "valid.txt"
    train_file.write_text(text[:300_000])
    eval_file.write_text(text[-30_000:])
    pretrain_dir = tmp_path / "pretrain"
    metrics = train(load_recipe("recipes/tiny_gpt_shakespeare_scratch.yaml", [
        "data.dataset=null", "data.eval_split=null", f"data.train_file={train_file}", f"data.eval_file={eval_file}",
        "data.max_length=64", "scratch.layers=2", "scratch.hidden_size=128", "scratch.vocab_size=1000",
        "scratch.context_length=64", "training.max_steps=300", "training.batch_size=16", "training.eval_every=no",
        "training.save_every=no", f"output.dir={pretrain_dir}",
    ]))
    tokenizer = AutoTokenizer.from_pretrained(pretrain_dir)
    unigram = unigram_cross_entropy(tokenizer, train_file.read_text(), eval_file.read_text())
    trained = metrics["after"]["loss"]
    print(f"tiny GPT eval loss {trained:.3f} nats/token vs unigram baseline {unigram:.3f}")
    assert trained < unigram - 0.5, (trained, unigram)
    assert metrics["before"]["loss"] > unigram  # the random model starts above the baseline

    chat = [{"messages": [{"role": "user", "content": "Speak, friend."},
                          {"role": "assistant", "content": "I will, good sir."}]}] * 16
    sft_dir = tmp_path / "sft"
    train(load_recipe("recipes/tiny_gpt_shakespeare_sft.yaml", [
        f"model.name={pretrain_dir}", "data.dataset=null", f"data.train_file={write_jsonl(tmp_path / 'chat.jsonl', chat)}",
        "data.format=messages", "data.validation_fraction=0", "data.max_length=64",  # the model's context length
        "training.max_steps=3", f"output.dir={sft_dir}",
    ]))
    generation = json.loads((sft_dir / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert (eos[0] if isinstance(eos, list) else eos) == tokenizer.convert_tokens_to_ids("<|im_end|>")
