"""The fast defaults: padding-free batches with per-sample attention, labelled-positions-only scoring, bf16 only
where the CPU has it, length-grouped padded batches - each must give the numbers the slow way gives."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForCausalLM

from llmtune import build_trainer, load_recipe
from llmtune.errors import LlmtuneError
from llmtune.kernels.attention import SDPA_VARLEN, attention_for, sdpa_varlen_attention
from llmtune.run.precision import cpu_has_native_bf16, resolved_precision


@pytest.mark.parametrize(("flags", "expected"), [
    ("fpu sse avx2 avx512f avx512_bf16 avx512_vnni", True),
    ("fpu sse avx2 amx_bf16 amx_tile", True),
    ("fpu sse avx2 fma", False),
])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, monkeypatch, flags, expected):
    monkeypatch.delenv("LLMTUNE_CPU_BF16", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(cpuinfo) is expected
    assert cpu_has_native_bf16(tmp_path / "missing") is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choice of precision")
def test_auto_precision_is_bf16_only_on_cpus_with_native_bf16(monkeypatch):
    """The probe follows the CPU flags unless LLMTUNE_CPU_BF16 pins it (how the suite runs the bf16 paths on any
    CPU)."""
    monkeypatch.setenv("LLMTUNE_CPU_BF16", "0")
    assert resolved_precision("auto") == "fp32"
    monkeypatch.setenv("LLMTUNE_CPU_BF16", "1")
    assert resolved_precision("auto") == "bf16"
    assert resolved_precision("fp32") == "fp32"


def test_liger_kernels_only_where_they_run(monkeypatch):
    """Liger's kernels are Triton/CUDA: auto turns them on only with a GPU and the package; 'on' without them
    is an error naming the field and what is missing."""
    import llmtune.run.training as training

    installed = {"liger_kernel": True}
    monkeypatch.setattr(training.importlib.util, "find_spec", lambda name: object() if installed.get(name) else None)
    monkeypatch.setattr(training.torch.cuda, "is_available", lambda: True)
    assert training.liger_kernels_on("auto") and training.liger_kernels_on("on")
    assert not training.liger_kernels_on("off")
    installed["liger_kernel"] = False
    assert not training.liger_kernels_on("auto")
    with pytest.raises(LlmtuneError, match=r"training\.liger_kernels.*pip install liger-kernel"):
        training.liger_kernels_on("on")
    monkeypatch.setattr(training.torch.cuda, "is_available", lambda: False)
    with pytest.raises(LlmtuneError, match="CUDA GPU"):
        training.liger_kernels_on("on")


def test_auto_attention_is_per_sample_sdpa_for_padding_free_batches_unless_flash_attention_fits(monkeypatch):
    from llmtune.kernels import attention

    flash_attn = {"installed": False}
    monkeypatch.setattr(attention.importlib.util, "find_spec",
                        lambda name: object() if name == "flash_attn" and flash_attn["installed"] else None)
    for cuda in (False, True):
        monkeypatch.setattr(attention.torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert attention_for("auto", padding_free=True, precision="bf16") == SDPA_VARLEN  # no flash-attn installed
        assert attention_for("auto", padding_free=False, precision="fp32") == "sdpa"
        assert attention_for("eager", padding_free=True, precision="fp32") == "eager"
    flash_attn["installed"] = True
    assert attention_for("auto", padding_free=True, precision="bf16") == "flash_attention_2"
    assert attention_for("auto", padding_free=True, precision="fp32") == SDPA_VARLEN  # flash-attn has no float32


def test_on_a_gpu_a_padding_free_row_takes_one_masked_call_per_layer_with_the_per_sample_numbers(tiny_llama,
                                                                                               monkeypatch):
    """On CUDA, rows up to ONE_CALL_MAX_TOKENS go through one SDPA call with a block-diagonal causal mask (kernel
    launches, not FLOPs, bound a GPU step); here the CUDA choice is forced on the CPU."""
    import types

    from transformers import AutoModelForCausalLM

    from llmtune.kernels import attention

    lengths = [5, 9, 4]
    ids = torch.randint(3, 100, (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation=SDPA_VARLEN)
    on_a_gpu, on_a_cpu = (types.SimpleNamespace(device=torch.device(device), shape=(1, 9, 2000, 64))
                          for device in ("cuda", "cpu"))
    assert attention.attends_in_one_call(on_a_gpu) and not attention.attends_in_one_call(on_a_cpu)
    on_a_gpu.shape = (1, 9, attention.ONE_CALL_MAX_TOKENS + 1, 64)
    assert not attention.attends_in_one_call(on_a_gpu)  # a long row: the loop's sum(L^2) wins
    calls = []
    forward = attention.sdpa_attention_forward
    cudnn_allowed = torch.backends.cuda.cudnn_sdp_enabled
    monkeypatch.setattr(attention, "sdpa_attention_forward",
                        lambda *a, **k: calls.append(cudnn_allowed()) or forward(*a, **k))
    logits = {}
    for one_call in (False, True):
        monkeypatch.setattr(attention, "attends_in_one_call", lambda query, one_call=one_call: one_call)
        calls.clear()
        logits[one_call] = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        assert len(calls) == model.config.num_hidden_layers * (1 if one_call else len(lengths))
        # cuDNN's masked kernel plans anew for every row length (96 ms each on an H200): the one call avoids it
        assert not any(calls) if one_call else all(calls)
    assert cudnn_allowed()
    alone = torch.cat([model(input_ids=piece, use_cache=False).logits for piece in ids.split(lengths, 1)], 1)
    for got in logits.values():
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_per_sample_attention_on_a_cpu_under_bf16_autocast_attends_in_float32():
    """Faster there than bf16 (see llmtune/kernels/attention.py), and exact: each sample as float32 SDPA alone."""
    import types

    import torch.nn.functional as F

    torch.manual_seed(0)
    module = types.SimpleNamespace(is_causal=True, training=False, num_key_value_groups=3, layer_idx=0)
    lengths = [5, 9, 4]
    query = torch.randn(1, 6, sum(lengths), 8, dtype=torch.bfloat16, requires_grad=True)
    key, value = (torch.randn(1, 2, sum(lengths), 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = sdpa_varlen_attention(module, query, key, value, None, position_ids=positions)
    assert out.dtype == torch.float32
    expected = torch.cat([
        F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(3, 1), v.float().repeat_interleave(3, 1),
                                       is_causal=True).transpose(1, 2)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))], dim=1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.sum().backward()  # gradients reach the bf16 projections in their own dtype
    assert query.grad.dtype == key.grad.dtype == torch.bfloat16 and query.grad.abs().sum() > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # evaluation: as `llmtune eval` computes it
        assert sdpa_varlen_attention(module, query, key, value, None, position_ids=positions)[0].dtype == torch.bfloat16


def test_padded_classification_batches_are_grouped_by_length(tmp_path):
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"{'word ' * (i % 9 + 1)},{i % 2}\n" for i in range(40)))
    recipe = load_recipe({"task": "classification", "model": {"name": "minilm"}, "data": {"train_file": str(data)},
                          "output": {"dir": str(tmp_path / "run")}}, ["data.validation_fraction=0"])
    trainer = build_trainer(recipe)
    assert trainer.args.train_sampling_strategy == "group_by_length"
    if not torch.cuda.is_available():
        assert trainer.args.use_liger_kernel is False  # liger_kernels: auto
    off = load_recipe({"task": "classification", "model": {"name": "minilm"}, "data": {"train_file": str(data)},
                       "output": {"dir": str(tmp_path / "run2")}}, ["data.validation_fraction=0",
                                                                   "training.group_by_length=false"])
    trainer = build_trainer(off)
    assert trainer.args.train_sampling_strategy == "random"
    # The heap trim after each step is opt-in (training.release_memory): it is off here, on when asked.
    from llmtune.run.callbacks import ReleaseFreedMemory

    def trims(trainer) -> bool:
        return any(isinstance(cb, ReleaseFreedMemory) for cb in trainer.callback_handler.callbacks)

    assert not trims(trainer)
    assert trims(build_trainer(load_recipe({"task": "classification", "model": {"name": "minilm"}, "data": {
        "train_file": str(data)}, "output": {"dir": str(tmp_path / "run3")}}, ["data.validation_fraction=0",
                                                                           "training.release_memory=true"])))


@pytest.mark.slow  # the real SmolLM2
def test_real_smollm2_fast_path_loss_equals_padded_full_logits_loss(alpaca_files, smollm2_path, tmp_path):
    """SmolLM2 on real Alpaca rows: llmtune's default batch (one padding-free row, per-sample SDPA, only answer
    positions through the head) gives the loss a padded batch with full logits gives (1e-4)."""
    recipe = load_recipe("recipes/smollm2_alpaca_lora.yaml", [
        "data.dataset=null", f"data.train_file={alpaca_files['train']}", "data.validation_fraction=0",
        "data.max_length=256", "training.batch_size=4", f"output.dir={tmp_path / 'run'}"])
    trainer = build_trainer(recipe)
    assert trainer.labelled_logits_only and trainer.model.config._attn_implementation == SDPA_VARLEN
    samples = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(samples)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    trainer.model.eval()
    with torch.no_grad():
        fast = trainer.compute_loss(trainer.model, dict(batch)).item()

    reference_model = AutoModelForCausalLM.from_pretrained(smollm2_path, attn_implementation="sdpa").eval()

    def right_padded(key: str, value: int) -> torch.Tensor:
        return pad_sequence([torch.tensor(s[key]) for s in samples], batch_first=True, padding_value=value)

    input_ids = right_padded("input_ids", trainer.processing_class.pad_token_id)
    padded = {"input_ids": input_ids, "labels": right_padded("labels", -100),
              "attention_mask": right_padded("input_ids", -1).ne(-1).long()}
    with torch.no_grad():  # the fresh LoRA adapter is zero, so the base model is the reference
        logits = reference_model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    labels = padded["labels"][:, 1:].flatten()
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels, ignore_index=-100).item()
    assert fast == pytest.approx(reference, abs=1e-4)


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_a_cpu_run_hands_freed_heap_memory_back_after_a_step_within_its_time_share():
    from llmtune.run.callbacks import ReleaseFreedMemory

    release = ReleaseFreedMemory()
    if release._trim is None or not os.path.exists("/proc/self/statm"):
        pytest.skip("needs glibc's malloc_trim and Linux's /proc (this C library or OS has neither)")
    if os.environ.get("LD_PRELOAD") or any(name.startswith("MALLOC_") for name in os.environ):
        pytest.skip("another allocator is preloaded or glibc's malloc is tuned: the heap layout below does not hold")
    cpu = SimpleNamespace(device=torch.device("cpu"))
    release.on_train_begin(cpu, None, None)
    # What a step leaves: many freed 1 MB tensors inside the heap, below one that is still alive.
    torch.empty(8 * 2**20, dtype=torch.uint8).fill_(1)  # freed at once: glibc now keeps 1 MB blocks in its heap
    blocks = [torch.empty(2**20, dtype=torch.uint8).fill_(1) for _ in range(300)]
    kept = blocks.pop()
    blocks.clear()
    before = _resident_mb()
    release.on_step_end(cpu, None, None)
    assert before - _resident_mb() > 150, "the freed blocks stayed resident"
    assert kept.sum() == 2**20
    # The trim's cost sets how often it may run: right after one, the next step skips it.
    calls = []
    release._trim = lambda pad: calls.append(time.sleep(0.01))
    release._since, release._cost = 0.0, 0.0
    for _ in range(3):
        release.on_step_end(cpu, None, None)
    assert len(calls) == 1
    release._since -= 100.0  # as if steps had run for far longer than the trim
    release.on_step_end(cpu, None, None)
    assert len(calls) == 2
    gpu = ReleaseFreedMemory()
    gpu.on_train_begin(SimpleNamespace(device=torch.device("cuda")), None, None)
    assert gpu._trim is None
