"""Canaries for llmtune/patches: each test pins the upstream behaviour a patch relies on or works around, and fails
when a library release changes it - the signal to drop or adapt that patch."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    """A 1-layer Llama 64 wide: the smallest that bitsandbytes' CPU repacking (64-value blocks) accepts."""
    folder = tmp_path_factory.mktemp("llama64")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder)
    return folder


def quantized(folder):
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))


def test_bnb_still_repacks_4bit_weights_after_eval(llama64, bnb_avx512bf16):
    """patches/bnb_cpu_repacking.py. On a CPU with avx512_bf16, one eval-mode forward without grad leaves the 4-bit
    weights in an inference-only layout, after which gradients through the layer are missing (the native bf16
    kernel, real hardware) or wrong (the fallback elsewhere). When this fails, bitsandbytes has fixed it."""
    import bitsandbytes as bnb

    from llmtune.patches.bnb_cpu_repacking import keep_4bit_weights_in_training_layout

    def gradient_after_an_evaluation(patched: bool) -> tuple[torch.Tensor | None, torch.Tensor, bool]:
        model = quantized(llama64)
        if patched:
            keep_4bit_weights_in_training_layout(model)
        layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
        torch.manual_seed(1)
        x = torch.randn(3, layer.in_features, requires_grad=True)
        layer(x).sum().backward()
        true_grad, x.grad = x.grad.clone(), None
        layer.eval()
        with torch.no_grad():
            layer(torch.randn(3, layer.in_features))  # an evaluation step
        layer.train()
        layer(x).sum().backward()
        repacked = bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
        return x.grad, true_grad, repacked

    grad, true_grad, repacked = gradient_after_an_evaluation(patched=False)
    assert repacked, "bitsandbytes no longer leaves the weights repacked after an evaluation: drop the workaround"
    assert grad is None or not torch.allclose(grad, true_grad, atol=1e-3), "gradients after evaluation are right again"
    grad, true_grad, repacked = gradient_after_an_evaluation(patched=True)
    assert not repacked and grad is not None
    torch.testing.assert_close(grad, true_grad)


def test_peft_custom_module_hook_builds_our_layer_and_saves_a_plain_config(tmp_path):
    """patches/peft_custom_module.py: the hook makes peft build llmtune's layer, and stays out of the saved config."""
    from peft import LoraConfig, get_peft_model

    from llmtune.kernels.lora_linear import FusedLoraLinear
    from llmtune.patches.peft_custom_module import use_lora_layer

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    config = LoraConfig(r=2, target_modules=["0"])
    use_lora_layer(config, torch.nn.Linear, FusedLoraLinear)
    peft_model = get_peft_model(model, config)
    assert type(peft_model.base_model.model[0]) is FusedLoraLinear
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not any("custom" in key for key in saved)


def test_trl_still_casts_quantized_adapters_to_bf16(llama64, tmp_path):
    """patches/trl_adapter_dtype.py: trl's SFTTrainer stores a quantized model's LoRA weights in bf16. When it
    stops (or gains a setting for it), the patch that casts them back to float32 can go."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig, SFTTrainer

    from llmtune.patches.trl_adapter_dtype import adapters_back_to_float32

    model = get_peft_model(quantized(llama64), LoraConfig(r=2, target_modules=["q_proj"]))
    data = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 4})
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", activation_checkpointing=False,
                     dataset_kwargs={"skip_prepare_dataset": True}, max_length=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tiny_tokenizer())
    dtypes = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert dtypes == {torch.bfloat16}, f"trl no longer casts the adapters (dtypes {dtypes}): drop the patch"
    assert adapters_back_to_float32(trainer.model) > 0
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(64)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", eos_token="t1")


def test_accelerate_fsdp_plugin_still_switches_state_dict_type():
    """patches/fsdp_full_state_dict.py: the final FSDP save switches accelerate's plugin to a full state dict.
    The save itself needs GPUs (benchmarks/gpu_check.py); here, that the switch still exists and takes effect."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    plugin = FullyShardedDataParallelPlugin(state_dict_type="SHARDED_STATE_DICT")
    plugin.set_state_dict_type("FULL_STATE_DICT")
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT


@pytest.mark.slow
def test_gguf_loaded_model_still_refuses_to_save_without_the_patch(tiny_llama, tmp_path):
    """patches/gguf_save.py: a model loaded from a GGUF file refuses save_pretrained until its quantizer marker is
    dropped; with the patch it saves and reloads with the same outputs. (A tiny GGUF written here: transformers
    marks every GGUF-loaded model alike, and dequantizing the installed SmolLM2 file took 12 s of CI; the real file
    goes through the same patch in every SmolLM2 test.)"""
    from transformers import AutoTokenizer

    from llmtune.patches.gguf_save import make_gguf_model_savable
    from llmtune.ship.gguf_file import write_gguf

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    path = tmp_path / "tiny.gguf"
    write_gguf(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), tokenizer, path, "f32", "tiny",
               {tokenizer.eos_token_id})
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    with pytest.raises(ValueError, match="gguf"):
        model.save_pretrained(tmp_path / "refused")
    make_gguf_model_savable(model)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def quickstart_recipe(tiny_bert, reviews_files, tmp_path, *overrides: str):
    """The quickstart recipe on the tiny BERT and the small reviews files: a length-grouped classification run."""
    from llmtune import load_recipe

    return load_recipe("recipes/quickstart.yaml", [
        f"model.name={tiny_bert}", f"data.train_file={reviews_files['train']}", "data.eval_file=null",
        "data.test_file=null", f"output.dir={tmp_path / 'run'}", *overrides])


def test_transformers_still_builds_length_grouped_batches_without_a_generator(tiny_bert, reviews_files, tmp_path):
    """patches/length_grouped_order.py: the training LengthGroupedSampler draws from the global RNG. When
    transformers gives it a generator of its own (seeded per epoch), the patch can go."""
    from llmtune import build_trainer
    from llmtune.patches.length_grouped_order import train_sampler

    loader = build_trainer(quickstart_recipe(tiny_bert, reviews_files, tmp_path)).get_train_dataloader()
    sampler = train_sampler(loader)
    assert sampler is not None, "llmtune no longer finds the length-grouped sampler"
    assert sampler.generator is None, "transformers now seeds the length-grouped order itself: drop the patch"


def test_transformers_length_grouped_batches_still_come_longest_first_in_each_megabatch():
    """patches/length_grouped_order.py: transformers sorts each megabatch of length-grouped batches longest first,
    a saw-tooth order that cost accuracy. When its batches come in another order, re-check the patch."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = torch.randint(1, 200, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    indices = list(LengthGroupedSampler(4, lengths=lengths, generator=torch.Generator().manual_seed(1)))
    megabatch = [lengths[i] for i in indices[100:200]]  # the second of four (the first has its longest swapped in)
    assert megabatch == sorted(megabatch, reverse=True), "transformers changed its length-grouped order"


def test_length_grouped_batches_keep_their_samples_but_come_in_random_order(tiny_bert, reviews_files, tmp_path):
    """llmtune's training sampler, after the epoch-begin hook: the batches transformers would build with the same
    generator (same samples together, so the same padding), the longest first, the rest shuffled - not longest to
    shortest in each megabatch - and the same order again for the same seed and epoch (a resumed run)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from llmtune import build_trainer
    from llmtune.patches.length_grouped_order import SeededLengthGroupedOrder, train_sampler

    recipe = quickstart_recipe(tiny_bert, reviews_files, tmp_path, "training.batch_size=2")
    trainer = build_trainer(recipe)
    loader = trainer.get_train_dataloader()
    state = type("State", (), {"epoch": 0})()
    SeededLengthGroupedOrder(recipe.training.seed).on_epoch_begin(None, state, None, train_dataloader=loader)
    sampler = train_sampler(loader)
    ours = list(sampler)
    theirs = list(LengthGroupedSampler(2, lengths=sampler.lengths,
                                       generator=torch.Generator().manual_seed(recipe.training.seed)))
    batches = [tuple(ours[i:i + 2]) for i in range(0, len(ours), 2)]
    assert sorted(batches) == sorted(tuple(theirs[i:i + 2]) for i in range(0, len(theirs), 2))
    assert batches[0] == tuple(theirs[:2]) and batches != [tuple(theirs[i:i + 2]) for i in range(0, len(theirs), 2)]
    SeededLengthGroupedOrder(recipe.training.seed).on_epoch_begin(None, state, None, train_dataloader=loader)
    assert list(sampler) == ours


def test_trl_fused_lm_head_still_projects_every_position_on_cpu():
    """patches/trl_compact_lm_head.py: trl's fused head decides with `_use_triton` whether to project only the
    labelled positions, and says no on a CPU. When it says yes (or uses the name for more than that choice), the
    patch must go or be re-checked."""
    import inspect

    from trl.trainer import utils as trl_utils

    from llmtune.patches import trl_compact_lm_head

    assert trl_compact_lm_head._trl_choice(torch.device("cpu")) is False, "trl now compacts on CPU: drop the patch"
    source = inspect.getsource(trl_utils)
    assert source.count("_use_triton(") == 1 and "compact = _use_triton(" in source, (
        "trl.trainer.utils now uses _use_triton for more than the compact-positions choice: re-check the patch")


def test_compact_lm_head_gives_trls_log_probs_and_gradients(monkeypatch):
    """With the patch, the fused head projects only the labelled positions and returns trl's own log-probabilities,
    loss and gradients."""
    from trl.trainer import utils as trl_utils

    from llmtune.patches import trl_compact_lm_head

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(0, 96, (2, 12))
    labels = ids.clone()
    labels[:, :8] = -100  # a prompt of 8 tokens: positions 7..10 predict the 4 labelled tokens
    projected = []
    apply = trl_utils._ChunkedLogProbFunction.apply

    def spy(hidden, *args):
        projected.append(hidden.shape[0])
        return apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy)

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return out, grads

    monkeypatch.setattr(trl_utils, "_use_triton", trl_compact_lm_head._trl_choice)
    full, full_grads = run()
    with trl_compact_lm_head.labelled_positions_only_on_cpu():
        compact, compact_grads = run()
    assert trl_utils._use_triton is trl_compact_lm_head._trl_choice, "the swap must end with the context"
    assert projected == [2 * 11, 2 * 4]
    for name in ("log_probs", "entropy", "is_top1"):
        torch.testing.assert_close(getattr(compact, name), getattr(full, name))
    torch.testing.assert_close(compact.loss, full.loss)
    for got, want in zip(compact_grads, full_grads, strict=True):
        torch.testing.assert_close(got, want)


FSDP2_TIED_HEAD = """
import os, sys, socket
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
dist.init_process_group("gloo", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
fused = sys.argv[1] == "fused"
if fused:
    add_fused_lm_head(model, outputs=("log_probs",))
# accelerate 1.15's FSDP2 wrapping: each block, then [final norm, input embedding, tied head] in one group, then the root
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard([model.model.norm, model.model.embed_tokens, model.lm_head], mesh=mesh, reshard_after_forward=False)
fully_shard(model, mesh=mesh)
ids = torch.randint(0, 64, (2, 8))
for step in range(3):
    if fused:  # trl: the backbone, then the head's weight read directly (lm_head.forward never runs)
        loss = -model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs.mean()
    else:  # llmtune's LMTrainer off the fused head: the labelled positions through lm_head.forward
        logits = model(input_ids=ids, logits_to_keep=torch.arange(7)).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    model.reshard()  # what a sharded checkpoint save leaves behind
print("trained")
"""


@pytest.mark.slow  # two 8-second processes
@pytest.mark.parametrize("head", ["fused", "labelled"])
def test_fsdp2_gate_matches_whether_torch_gathers_a_tied_head_group_the_fused_head_skips(head):
    """patches/trl_compact_lm_head.fused_head_breaks_fsdp2: on torch < 2.13, FSDP2 gathers a group of modules again
    only after every module in it ran forward, and trl's fused LM head never calls the tied output head, so after a
    sharded save the embedding stays sharded ("mixed torch.Tensor and DTensor", seen on an H200 with torch 2.11).
    Run on a CPU mesh: trl's fused head must train across saves exactly when the gate says it is safe (on a torch
    where it fails while the gate says otherwise, the gate is wrong), and the path llmtune takes instead always
    trains."""
    import subprocess
    import sys

    from llmtune.patches.trl_compact_lm_head import fused_head_breaks_fsdp2

    done = subprocess.run([sys.executable, "-c", FSDP2_TIED_HEAD, head], capture_output=True, text=True, timeout=120)
    trains = done.returncode == 0 and "trained" in done.stdout
    if head == "fused":
        assert trains == (not fused_head_breaks_fsdp2()), done.stderr[-2000:]
    else:
        assert trains, done.stderr[-2000:]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="oneDNN has no bf16 on this CPU (no AVX-512 and no AMX): llmtune never packs weights here")
@pytest.mark.parametrize("bias", [False, True])
def test_torch_still_has_onednn_packed_linear_giving_the_plain_matmuls_results(bias):
    """kernels/frozen_linear.py (torch private ops). Where oneDNN runs bf16, torch's packed-weight ops must exist and give the
    plain matmuls' results bit for bit, forward and input gradient, for a contiguous or a strided input."""
    from llmtune.kernels.frozen_linear import FrozenLinear, packs

    assert packs(torch.bfloat16) and not packs(torch.float32)
    torch.manual_seed(0)
    for rows, width, features in ((7, 24, 40), (500, 1536, 576)):  # a toy and a SmolLM2 down projection
        weight = torch.randn(features, width).bfloat16()
        x, grad = torch.randn(rows, width).bfloat16(), torch.randn(rows, features).bfloat16()
        bias_ = torch.randn(features).bfloat16() if bias else None
        packed, plain = FrozenLinear.cast(weight.float(), bias_, torch.bfloat16), FrozenLinear(weight, bias_)
        assert packed.packed and packed.weight.is_mkldnn and not plain.packed
        assert torch.equal(packed.forward(x), plain.forward(x))
        assert torch.equal(packed.forward(x.T.contiguous().T), plain.forward(x))
        assert torch.equal(packed.input_grad(grad), plain.input_grad(grad))
    assert not FrozenLinear.cast(weight, bias_, torch.bfloat16).packed  # already bf16: the cast is free, no pair
    with torch.backends.mkldnn.flags(enabled=False):
        assert not packs(torch.bfloat16)


@pytest.mark.slow  # parses a 49k-token vocabulary three times (~15 s)
def test_transformers_still_opens_a_gguf_reader_per_load_call(tiny_llama, tmp_path, monkeypatch):
    """patches/gguf_read_once.py: transformers builds a new gguf.GGUFReader on each load_gguf_checkpoint call
    (when it reuses one, the patch can go); within the patch a model and its tokenizer come from one reader and
    hold exactly the weights written."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    from llmtune.models.sources import load_gguf
    from llmtune.ship.gguf_file import write_gguf

    source = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    path = tmp_path / "tiny.gguf"
    write_gguf(source, tokenizer, path, "f32", "tiny", {tokenizer.eos_token_id})
    opened = []
    reader_class = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *args, **kwargs: opened.append(args) or reader_class(*args, **kwargs))
    for _ in range(2):
        AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert len(opened) == 2, "transformers now reuses a GGUF reader: patches/gguf_read_once.py can go"

    opened.clear()
    model, loaded_tokenizer = load_gguf(path)
    assert len(opened) == 1
    assert gguf.get_tensor_name_map.__module__ == "gguf.tensor_mapping"  # restored after
    ids = tokenizer("Some probe text, 12 + 30 = 42.", return_tensors="pt")["input_ids"]
    assert torch.equal(loaded_tokenizer("Some probe text, 12 + 30 = 42.", return_tensors="pt")["input_ids"], ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits)


def test_lm_eval_ifeval_still_reads_nltk_punkt_data():
    """patches/ifeval_without_nltk_data.py: lm-eval's IFEval checkers count sentences through
    instructions_util._get_sentence_tokenizer(), split words with instructions_util.nltk.word_tokenize and try to
    download 'punkt_tab' on import. When any of that changes, the offline substitute must follow (or go)."""
    import inspect

    from lm_eval.tasks.ifeval import instructions

    from llmtune.patches.ifeval_without_nltk_data import ifeval_checkers

    util = ifeval_checkers()
    assert "_get_sentence_tokenizer()" in inspect.getsource(util.count_sentences)
    assert "instructions_util.nltk.word_tokenize(" in inspect.getsource(
        instructions.CapitalWordFrequencyChecker.check_following)
    assert '"tokenizers/punkt_tab"' in inspect.getsource(util.download_nltk_resources)
    assert util.count_sentences("Dr. Smith came home. He slept! Did he? Yes.") == 4
