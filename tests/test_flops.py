"""The speed benchmark's FLOP count (benchmarks/flops.py), checked against torch's own FLOP counter on one training
step: full fine-tuning, LoRA (frozen weights get no weight gradient) and a classifier (its head applied once per
sequence). The models use eager attention, whose matmuls torch's counter sees (it has no formula for the CPU
flash kernel), compared over the whole square they compute; the benchmark itself counts the causal half a decoder
needs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from flops import TokenStats, counted_flops, document_lengths, linear_layers, training_flops  # noqa: E402


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager"))


def loss_of(model, batch):
    return model(**batch).loss


def test_full_fine_tuning_counts_six_flops_per_weight_like_torchs_counter():
    model = llama()
    batch = {"input_ids": torch.randint(0, 256, (2, 24)), "labels": torch.randint(0, 256, (2, 24))}
    stats = TokenStats(causal=False)  # torch counts the attention square; no label is -100: the head runs everywhere
    stats.add(batch)
    stats.head_positions = stats.tokens  # HF's model projects every position, the last one included
    assert training_flops(model, stats) == pytest.approx(counted_flops(model, loss_of, batch), rel=0.01)


def test_lora_counts_no_weight_gradient_for_frozen_weights():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama(), LoraConfig(r=4, target_modules="all-linear"))
    batch = {"input_ids": torch.randint(0, 256, (2, 24)), "labels": torch.randint(0, 256, (2, 24))}
    stats = TokenStats(causal=False)
    stats.add(batch)
    stats.head_positions = stats.tokens
    counted = counted_flops(model, loss_of, batch)
    # 4% over here: the first layer's q/k/v read the frozen embeddings, so autograd skips their input gradient; that
    # is 1/layers of the q/k/v input gradients (0.2% of SmolLM2-135M's count), which the count does not model
    assert counted < training_flops(model, stats) < 1.05 * counted
    six_n = 6 * sum(layer.weights for layer in linear_layers(model)) * stats.tokens
    assert six_n > 1.25 * counted  # the old MFU numerator, 6 x N, overstates an adapter run by a third here


def test_a_classifier_head_runs_once_per_sequence_and_padding_is_not_counted():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=128, num_labels=2,
                                                     attn_implementation="eager"))
    batch = {"input_ids": torch.randint(0, 128, (3, 16)), "labels": torch.tensor([0, 1, 1])}
    stats = TokenStats(causal=False)
    stats.add(batch)
    assert stats.head_positions == 3 and {layer.name for layer in linear_layers(model) if layer.head} == {
        "bert.pooler.dense", "classifier"}
    assert training_flops(model, stats) == pytest.approx(counted_flops(model, loss_of, batch), rel=0.01)
    padded = {"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.tensor([[1] * 8, [1] * 3 + [0] * 5])}
    assert document_lengths(padded) == [8, 3]


def test_a_packed_row_splits_into_its_documents_and_a_causal_one_counts_half_the_pairs():
    packed = {"input_ids": torch.ones(1, 7, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1]])}
    assert document_lengths(packed) == [3, 2, 2]
    stats = TokenStats(causal=True)
    stats.add({**packed, "labels": torch.tensor([[-100, 5, 5, -100, 5, -100, 5]])})
    assert (stats.tokens, stats.pairs, stats.head_positions) == (7, 6 + 3 + 3, 4)


def test_dpos_reference_pass_adds_one_forward_of_the_adapter_off_model():
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    model = get_peft_model(llama(), LoraConfig(r=4, target_modules="all-linear"))
    batch = {"input_ids": torch.randint(0, 256, (2, 24))}
    stats = TokenStats(causal=False)
    stats.add(batch)  # no labels: the head at every position, as HF's forward computes it
    with FlopCounterMode(display=False) as counter, torch.no_grad(), model.disable_adapter():
        model(**batch)
    added = training_flops(model, stats, reference_forward=True) - training_flops(model, stats)
    assert added == pytest.approx(counter.get_total_flops(), rel=0.01)
