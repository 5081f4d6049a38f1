"""llmtune's fused LoRA linear layer must compute exactly what peft's layer computes - outputs and gradients - and
hand everything it does not fuse back to peft, so that saved adapters stay ordinary peft adapters."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import write_jsonl
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from transformers import AutoModelForCausalLM

from llmtune import build_trainer, load_recipe
from llmtune.kernels import frozen_linear, lora_linear
from llmtune.kernels.lora_linear import FusedLoraLinear
from llmtune.patches.peft_custom_module import use_lora_layer


class TwoLinears(torch.nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.up = torch.nn.Linear(24, 40, bias=bias)
        self.down = torch.nn.Linear(40, 24, bias=bias)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def adapted(base: torch.nn.Module, fused: bool, **lora) -> torch.nn.Module:
    """The same adapters on a copy of `base`, in llmtune's layer or in peft's."""
    torch.manual_seed(1)  # init_lora_weights=False: B is random too, so every gradient is non-zero
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False, **lora)
    if fused:
        use_lora_layer(config, torch.nn.Linear, FusedLoraLinear)
    return get_peft_model(copy.deepcopy(base), config)


def outputs_and_grads(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    model(x).float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return [model(x).detach(), x.grad, *grads]


@pytest.fixture()
def fused_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    apply = lora_linear._LoraMatmul.apply
    monkeypatch.setattr(lora_linear._LoraMatmul, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_fused_layer_gives_peft_outputs_and_gradients(bias, fused_calls):
    base = TwoLinears(bias)
    x = torch.randn(2, 5, 24)
    reference = outputs_and_grads(adapted(base, fused=False), x)
    model = adapted(base, fused=True)
    assert {type(m) for m in model.modules() if isinstance(m, PeftLoraLinear)} == {FusedLoraLinear}
    for got, want in zip(outputs_and_grads(model, x), reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert fused_calls, "the fused path was not taken"


def test_fused_layer_under_bf16_autocast_matches_peft_and_keeps_float32_adapters(fused_calls):
    base = TwoLinears(bias=True)
    x = torch.randn(2, 5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = outputs_and_grads(adapted(base, fused=False), x)
        model = adapted(base, fused=True)
        got = outputs_and_grads(model, x)
    assert fused_calls and got[0].dtype == torch.bfloat16
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    for g, want in zip(got, reference, strict=True):
        torch.testing.assert_close(g.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_frozen_weights_are_cast_for_autocast_once_and_again_after_they_change(fused_calls):
    base = TwoLinears(bias=True)
    model = adapted(base, fused=True)
    layer = model.base_model.model.up
    x = torch.randn(2, 5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = model(x)
        cast = layer._frozen_base_in(torch.bfloat16)
        second = model(x)
        assert layer._frozen_base_in(torch.bfloat16) is cast, "cast again although the weight had not changed"
        torch.testing.assert_close(second, first, rtol=0, atol=0)
        with torch.no_grad():  # as loading a checkpoint into the model does
            layer.base_layer.weight.mul_(2)
        changed = model(x)
        fresh = adapted(base, fused=True)  # nothing cached yet
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(changed, fresh(x), rtol=0, atol=0)
    assert fused_calls and not torch.equal(changed, first)


@pytest.mark.parametrize("lora", [{"lora_dropout": 0.1}, {"use_dora": True}], ids=["dropout", "dora"])
def test_what_the_fused_path_does_not_cover_is_peft_unchanged(lora, fused_calls):
    base = TwoLinears(bias=True)
    x = torch.randn(2, 5, 24)
    torch.manual_seed(2)
    reference = outputs_and_grads(adapted(base, fused=False, **lora).eval(), x)
    torch.manual_seed(2)
    got = outputs_and_grads(adapted(base, fused=True, **lora).eval(), x)
    for g, want in zip(got, reference, strict=True):
        torch.testing.assert_close(g, want)
    assert not fused_calls


def test_disabled_or_merged_adapters_give_the_base_or_merged_output(fused_calls):
    base = TwoLinears(bias=True)
    x = torch.randn(3, 24)
    model = adapted(base, fused=True)
    with torch.no_grad():
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base(x))
        assert not fused_calls
        adapter_output = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), adapter_output, rtol=1e-5, atol=1e-6)
    assert len(fused_calls) == 2  # only the adapter forward: two layers, one call each


class ThreeReaders(torch.nn.Module):
    """q, k and v of an attention block: three projections of one input."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(24, 24) for _ in range(3))

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x)


def test_projections_of_one_input_share_one_saved_bf16_copy_and_keep_pefts_gradients(fused_calls):
    torch.manual_seed(0)
    base, x = ThreeReaders(), torch.randn(2, 5, 24)
    targets = dict(target_modules=["q", "k", "v"], init_lora_weights=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        reference = outputs_and_grads(get_peft_model(copy.deepcopy(base), LoraConfig(r=4, **targets)), x)
        torch.manual_seed(1)
        config = LoraConfig(r=4, **targets)
        use_lora_layer(config, torch.nn.Linear, FusedLoraLinear)
        model = get_peft_model(copy.deepcopy(base), config)
        got = outputs_and_grads(model, x)
        saved_inputs = set()

        def pack(tensor):
            if tensor.shape == (10, 24) and torch.equal(tensor, x.reshape(10, 24).to(tensor.dtype)):
                saved_inputs.add(tensor.untyped_storage().data_ptr())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(x.clone().requires_grad_())
    assert len(fused_calls) >= 3 and len(saved_inputs) == 1, "each projection saved its own bf16 copy of the input"
    for g, want in zip(got, reference, strict=True):
        torch.testing.assert_close(g.float(), want.float(), rtol=2e-2, atol=2e-2)
    with torch.inference_mode():
        made_for_inference = torch.randn(2, 5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model(made_for_inference)  # a tensor without a version counter is cast, not shared
    del got, reference, model, made_for_inference
    assert lora_linear._last_cast is None, "the shared copy outlived its input"


def test_the_cast_copy_is_dropped_when_moved_merged_or_copied_and_never_made_in_inference_mode():
    model = adapted(TwoLinears(bias=True), fused=True)
    layer = model.base_model.model.up
    x = torch.randn(2, 5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.inference_mode():
            model(x)
        assert "_cast_base" not in vars(layer)
        model(x).float().sum().backward()  # a later training step can save what it casts
        assert "_cast_base" in vars(layer) and layer.lora_A["default"].weight.grad is not None
        assert "_cast_base" not in vars(copy.deepcopy(model).base_model.model.up)
        model.to(torch.float32)
        assert "_cast_base" not in vars(layer)
        model(x)
        layer.merge()
        assert "_cast_base" not in vars(layer)
        merged = model(x)
        layer.unmerge()
        assert "_cast_base" not in vars(layer)
    torch.testing.assert_close(merged.float(), model(x).float(), rtol=2e-2, atol=2e-2)


def test_disabled_adapters_under_autocast_give_the_base_output_autocast_gives():
    """DPO's reference pass: the policy with its adapters off, through the base weights' cached cast."""
    base = TwoLinears(bias=True)
    x = torch.randn(3, 24)
    model = adapted(base, fused=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with model.disable_adapter():
            got = model(x)
        want = base(x)
    assert got.dtype == torch.bfloat16 and "_cast_base" in vars(model.base_model.model.up)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(not frozen_linear.packs(torch.bfloat16), reason="no packed bf16 weights here (this "
                    "CPU's oneDNN has no bf16, or torch lacks the ops): the plain matmuls are tested above")
def test_training_under_bf16_autocast_uses_packed_weights_and_unpacked_ones_give_the_same_step(fused_calls):
    """Packed where oneDNN runs bf16; preference training keeps them unpacked (packing cost DPO time and memory)."""
    base, x = TwoLinears(bias=True), torch.randn(2, 5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = outputs_and_grads(model := adapted(base, fused=True), x)
        layers = [model.base_model.model.up, model.base_model.model.down]
        assert fused_calls and all(vars(layer)["_cast_base"][1].packed for layer in layers)
        lora_linear.keep_frozen_weights_unpacked(model)
        assert not any("_cast_base" in vars(layer) for layer in layers)  # the packed pair is freed at once
        model.zero_grad()
        fused_calls.clear()
        plain = outputs_and_grads(model, x)
        assert fused_calls and not any(vars(layer)["_cast_base"][1].packed for layer in layers)
    for got, want in zip(packed, plain, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("packs", [True, False], ids=["packed", "plain"])
def test_disabled_adapters_under_autocast_take_batches_of_any_shape(packs, monkeypatch):
    """DPO's reference pass hands the layer (batch x positions x features), packed or not (a GPU, a CPU without
    bf16 in oneDNN)."""
    if not packs:
        monkeypatch.setattr(frozen_linear, "packs", lambda dtype: False)
    base, x = TwoLinears(bias=True), torch.randn(2, 5, 24)
    model = adapted(base, fused=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with model.disable_adapter():
            got = model(x)
        want = base(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_disabled_adapters_with_an_input_that_needs_gradients_still_pass_them_back():
    """Packed matmuls have no autograd: a base-alone pass whose input needs gradients goes through peft."""
    base = TwoLinears(bias=True)
    model = adapted(base, fused=True)
    x = torch.randn(3, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16), model.disable_adapter():
        got, want = x.clone().requires_grad_(), x.clone().requires_grad_()
        model(got).float().sum().backward()
        base(want).float().sum().backward()
    torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)


def test_weights_not_whole_on_this_process_take_peft_path(fused_calls):
    """Under DeepSpeed ZeRO-3 a weight is gathered only when its own module runs (the fused path skips those
    calls): a ZeRO-3 weight, marked by its ds_id, must go through peft's forward."""
    model = adapted(TwoLinears(bias=False), fused=True)
    model.base_model.model.up.base_layer.weight.ds_id = 0
    model(torch.randn(3, 24))
    assert len(fused_calls) == 1  # `down` only


@pytest.mark.slow  # the real SmolLM2
def test_real_smollm2_lora_step_matches_peft_layers(alpaca_files, tmp_path, monkeypatch):
    """SmolLM2 with the Alpaca LoRA recipe (all linear layers): llmtune's default model trains through the fused
    layer, with peft's loss and adapter gradients on a real batch."""
    recipe = load_recipe("recipes/smollm2_alpaca_lora.yaml", [
        "data.dataset=null", f"data.train_file={alpaca_files['train']}", "data.validation_fraction=0",
        "data.max_length=256", "training.batch_size=4", f"output.dir={tmp_path / 'run'}"])
    trainer = build_trainer(recipe)
    model = trainer.model
    layers = [m for m in model.modules() if isinstance(m, PeftLoraLinear)]
    assert len(layers) == 7 * model.config.num_hidden_layers and all(type(m) is FusedLoraLinear for m in layers)
    with torch.no_grad():  # B starts at zero, which would leave A's gradient zero: give it values
        for layer in layers:
            layer.lora_B["default"].weight.normal_(std=0.01)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])

    def loss_and_grads() -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fused_loss, fused_grads = loss_and_grads()
    monkeypatch.setattr(FusedLoraLinear, "_fusable_adapter", lambda *args: None)  # peft's own forward
    peft_loss, peft_grads = loss_and_grads()
    assert fused_loss == pytest.approx(peft_loss, rel=1e-5)
    assert len(fused_grads) == 2 * len(layers)
    for name, grad in peft_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=pytest.mark.slow), "bf16"])
def test_trained_adapter_saves_as_a_plain_peft_adapter(tiny_llama, tmp_path, precision):
    """The saved adapter is exactly the trained one, in either training precision. (After bf16 training the
    Trainer's model keeps accelerate's bf16-autocast wrapper on its forward, so it is compared unwrapped: with the
    wrapper its logits differ from any fp32 computation by bf16 rounding, ~2e-3 here.)"""
    chats = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(16)]
    recipe = load_recipe(None, [
        "task=sft", f"model.name={tiny_llama}", f"data.train_file={write_jsonl(tmp_path / 'train.jsonl', chats)}",
        "data.validation_fraction=0", "method.type=lora", "method.target_modules=all-linear",
        "training.max_steps=2", "training.batch_size=4", "training.learning_rate=1e-2", "training.save_every=no",
        f"training.precision={precision}", f"output.dir={tmp_path / 'run'}"])
    trainer = build_trainer(recipe)
    assert any(type(m) is FusedLoraLinear for m in trainer.model.modules())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in before)
    trainer.save_model(str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert not any("custom" in key for key in config)

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "adapter")
    assert not any(isinstance(m, FusedLoraLinear) for m in reloaded.modules())
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, trained(ids).logits, rtol=1e-5, atol=1e-5)
