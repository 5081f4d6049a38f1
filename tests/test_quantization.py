"""Quantized loading (4-bit, 8-bit), optimizers by name and adapter defaults, on tiny models (fast)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import NO_REPORT, write_jsonl
from transformers import AutoModelForCausalLM

from llmtune import build_trainer, load_recipe, train
from llmtune.errors import LlmtuneError
from llmtune.kernels.lora_linear import FusedLoraLinear

CHATS = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(24)]


def recipe_for(model: str, tmp_path, *overrides: str):
    data = write_jsonl(tmp_path / "train.jsonl", CHATS)
    return load_recipe(None, [
        "task=sft", f"model.name={model}", f"data.train_file={data}", "data.validation_fraction=0.25",
        "data.max_length=64", "method.type=lora", "training.max_steps=3", "training.batch_size=4",
        "training.eval_every=1", "training.save_every=no", "training.learning_rate=1e-2",
        "eval.before_training=false", f"output.dir={tmp_path / 'run'}", NO_REPORT, *overrides,
    ])


@pytest.mark.parametrize("quantization", ["4bit", pytest.param("8bit", marks=pytest.mark.slow)])
def test_quantized_lora_trains_and_only_adapters_change(tiny_llama, tmp_path, quantization):
    import bitsandbytes as bnb

    recipe = recipe_for(tiny_llama, tmp_path, f"method.quantization={quantization}")
    trainer = build_trainer(recipe)
    layers = [m for m in trainer.model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    assert layers, "nothing was quantized"
    # bitsandbytes layers subclass nn.Linear; they keep peft's own bitsandbytes LoRA layers, not the fused one
    assert not any(isinstance(m, FusedLoraLinear) for m in trainer.model.modules())
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    # compute dtype auto is float32 off bf16 GPUs: the adapters stay float32 (trl would store them in bf16)
    assert {p.dtype for p in adapters.values()} == {torch.float32}
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if n in adapters and not torch.equal(p, adapters[n])]
    assert changed, "no adapter weight changed"
    assert trainer.evaluate()["eval_loss"] < before  # and what changed made held-out answers likelier


@pytest.mark.parametrize("method", [pytest.param("lora", marks=pytest.mark.slow), "dora"])  # QDoRA: the crash seen
@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=pytest.mark.slow), "bf16"])
def test_qlora_and_qdora_keep_learning_and_reload_as_on_a_bf16_cpu(tiny_llama, tmp_path, bnb_avx512bf16, method,
                                                                   precision):
    """With bitsandbytes behaving as on a CPU with avx512_bf16 (where 4-bit layers repack themselves at the first
    evaluation), the adapter changes between every pair of checkpoints - evaluations in between - and the saved
    adapter reloads on its 4-bit base and runs (QDoRA used to crash there on such CPUs)."""
    from safetensors.torch import load_file

    from llmtune.inference.trained import load_trained

    recipe = recipe_for(tiny_llama, tmp_path, f"method.type={method}", "method.quantization=4bit",
                        "method.quant_type=fp4", "method.double_quant=false", f"training.precision={precision}",
                        "training.save_every=1", "training.keep_checkpoints=3")
    train(recipe)
    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["recipe"]["method"]["quant_type"] == "fp4"
    assert record["precision"] == {"training": precision, "evaluation": precision}
    assert record["parameters"]["adapted_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]  # Llama default
    adapters = [load_file(run_dir / f"checkpoint-{step}" / "adapter_model.safetensors") for step in (1, 2, 3)]
    for earlier, later in zip(adapters, adapters[1:]):
        moved = [k for k in earlier if not torch.equal(earlier[k], later[k])]
        assert moved, "the adapter stopped changing between checkpoints"
    model, tokenizer, _ = load_trained(run_dir)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    ids = tokenizer("What is 2 plus 2?", return_tensors="pt")
    with torch.no_grad():
        tuned = model(**ids).logits
        with model.disable_adapter():
            base = model(**ids).logits
    assert (tuned - base).abs().max() > 1e-4  # the reloaded adapter carries what was trained


@pytest.mark.parametrize("name, expected", [("adamw_8bit", "bitsandbytes.AdamW/8"),
                                            ("paged_adamw_8bit", "bitsandbytes.AdamW/8"),  # unpaged off CUDA
                                            ("adamw", "torch.AdamW"), ("sgd", "torch.SGD")])
def test_optimizers_by_name(tiny_llama, tmp_path, name, expected):
    trainer = build_trainer(recipe_for(tiny_llama, tmp_path, f"training.optimizer={name}"))
    trainer.create_optimizer()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    described = f"{type(optimizer).__module__.split('.')[0]}.{type(optimizer).__name__}"
    if hasattr(optimizer, "args"):  # bitsandbytes optimizers: state precision in bits
        described += f"/{optimizer.args.optim_bits}"
    assert described == expected
    if name.startswith("paged_"):
        assert not getattr(optimizer, "is_paged", False)


def test_unknown_optimizer_suggests_the_right_name(tiny_llama, tmp_path):
    with pytest.raises(LlmtuneError, match="'training.optimizer' is 'adamw8bit'.*Did you mean \"adamw_8bit\""):
        recipe_for(tiny_llama, tmp_path, "training.optimizer=adamw8bit")


@pytest.mark.parametrize("model_type, expected", [("llama", {"q_proj", "k_proj", "v_proj", "o_proj"}),
                                                  ("gpt2", {"c_attn"}), ("bert", {"query", "value"})])
def test_default_target_modules_per_architecture(model_type, expected):
    from peft import TaskType
    from transformers import AutoConfig, AutoModel

    from llmtune.config.schema import MethodConfig
    from llmtune.models.adapters import apply_method, parameter_summary

    sizes = {"llama": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2),
             "gpt2": dict(n_embd=32, n_head=2), "bert": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)}
    config = AutoConfig.for_model(model_type, vocab_size=64, num_hidden_layers=1, **sizes[model_type])
    model = apply_method(AutoModel.from_config(config), MethodConfig(type="lora"), TaskType.FEATURE_EXTRACTION)
    assert set(parameter_summary(model)["adapted_modules"]) == expected


def test_all_linear_targets_every_linear_layer_but_the_head(tiny_llama, tmp_path):
    from llmtune.models.adapters import parameter_summary

    trainer = build_trainer(recipe_for(tiny_llama, tmp_path, "method.target_modules=all-linear"))
    targets = parameter_summary(trainer.model)["adapted_modules"]
    assert set(targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# --- bad input -----------------------------------------------------------------------------------------------


def test_quantization_with_full_fine_tuning_is_refused(tiny_llama, tmp_path):
    with pytest.raises(LlmtuneError, match="quantized weights cannot be trained directly.*method.type=lora"):
        recipe_for(tiny_llama, tmp_path, "method.type=full", "method.quantization=4bit")


def test_4bit_on_a_checkpoint_bitsandbytes_cannot_quantize(tiny_llama, tmp_path):
    """A checkpoint already quantized with another scheme (here GPTQ) cannot be quantized by bitsandbytes."""
    import shutil

    folder = tmp_path / "gptq-model"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    recipe = recipe_for(str(folder), tmp_path, "method.quantization=4bit")
    with pytest.raises(LlmtuneError, match="already quantized with gptq.*method.quantization=none"):
        train(recipe)
    assert not (tmp_path / "run").exists(), "a run directory was created for a run that could not start"


def test_missing_bitsandbytes_says_what_to_install(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an environment without it looks like
    with pytest.raises(LlmtuneError, match="needs bitsandbytes.*pip install bitsandbytes"):
        train(recipe_for(tiny_llama, tmp_path, "method.quantization=8bit"))


@pytest.mark.slow  # a QLoRA run and a merge
def test_save_merged_after_qlora_merges_into_a_full_precision_base(tiny_llama, tmp_path):
    from peft import PeftModel

    train(recipe_for(tiny_llama, tmp_path, "method.quantization=4bit", "output.save=merged"))
    run_dir = tmp_path / "run"
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "adapter" / "adapter_config.json").is_file()
    assert "quantization_config" not in json.loads((run_dir / "config.json").read_text())

    merged = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    base.resize_token_embeddings(merged.config.vocab_size)
    adapter = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        assert (merged(ids).logits - adapter(ids).logits).abs().max() <= 1e-4
