"""Write a causal LM as a GGUF file - weights, tokenizer, chat template and stop tokens - with the `gguf` package
alone (no llama.cpp checkout or build), and read it back with transformers to prove it holds the same model.

Llama-architecture decoders only (SmolLM2, TinyLlama, Llama 2/3 and others saved as LlamaForCausalLM): each
architecture needs its own tensor layout, and an untested one would be a file that loads and talks nonsense.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from llmtune.data.lm_tokenize import end_of_turn_token
from llmtune.errors import LlmtuneError
from llmtune.inference.generation import generate
from llmtune.inference.merge import allowed_difference
from llmtune.models.sources import load_gguf

ARCHITECTURES = {"LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA}
GREEDY_TOKENS = 32  # new tokens per reply when the check compares greedy replies
QUANTS = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# llama.cpp picks its pre-tokenizer (how text is split before BPE) by this name. These are the splits whose
# Hugging Face form can be recognised exactly; anything else is refused rather than guessed.
PRE_TOKENIZERS = {
    '{"type": "ByteLevel", "use_regex": true}': "gpt-2",
    '[{"individual_digits": true, "type": "Digits"}, {"type": "ByteLevel", "use_regex": true}]': "smollm",
}


def check_exportable(config: Any) -> None:
    """Refuse, before any weights load, a model (its transformers config) this writer cannot lay out faithfully."""
    architecture = (config.architectures or ["an unnamed architecture"])[0]
    if architecture not in ARCHITECTURES:
        raise LlmtuneError(
            f"GGUF export supports Llama-architecture decoders ({', '.join(ARCHITECTURES)}: SmolLM2, TinyLlama, "
            f"Llama 2/3); this run's model is {architecture}. Serve it with `llmtune serve`, or push it and "
            "convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise LlmtuneError(
            f"GGUF export writes plain RoPE (config rope_type 'default'); this model's config has rope_type "
            f"'{rope['rope_type']}' (Llama 3.1+ style scaling), which it cannot write yet. Convert the merged model "
            "(`llmtune merge RUN --out DIR`) with llama.cpp's convert_hf_to_gguf.py instead."
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise LlmtuneError(
                f"GGUF export writes Llama models without biases; this model's config has {flag}: true. Convert the "
                "merged model (`llmtune merge RUN --out DIR`) with llama.cpp's convert_hf_to_gguf.py instead."
            )


def check_tokenizer(tokenizer: Any) -> str:
    """Refuse a tokenizer llama.cpp would split differently from training; return its pre-tokenizer name."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    kind, decoder = spec["model"]["type"], (spec.get("decoder") or {}).get("type")
    if kind != "BPE" or decoder != "ByteLevel":
        raise LlmtuneError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2 / SmolLM2 style); this run's tokenizer is {kind} "
            f"with a {decoder} decoder (SentencePiece, as in Llama 2 and TinyLlama, is not supported yet). Convert "
            "the merged model (`llmtune merge RUN --out DIR`) with llama.cpp's convert_hf_to_gguf.py instead."
        )
    shape = _pre_tokenizer_shape(spec.get("pre_tokenizer"))
    if shape not in PRE_TOKENIZERS:
        raise LlmtuneError(
            f"The tokenizer splits text before BPE with {shape}, which llmtune cannot name for llama.cpp (it knows "
            f"{', '.join(PRE_TOKENIZERS.values())}); a GGUF with the wrong name would tokenize differently from "
            "training. Convert the merged model (`llmtune merge RUN --out DIR`) with llama.cpp's "
            "convert_hf_to_gguf.py, which recognises many more."
        )
    return PRE_TOKENIZERS[shape]


def write_gguf(model: torch.nn.Module, tokenizer: Any, path: Path, quant: str, name: str, stop_ids: set[int]) -> None:
    """Write `model` (a full-precision causal LM in memory) and its tokenizer to `path`."""
    check_exportable(model.config)
    tensor_type, file_type = QUANTS[quant]
    config = model.config
    arch = ARCHITECTURES[config.architectures[0]]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0], stop_ids)
    for tensor_name, data, raw_type in _tensors(model, arch, tensor_type):
        writer.add_tensor(tensor_name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def _tensors(model: torch.nn.Module, arch: gguf.MODEL_ARCH, tensor_type: gguf.GGMLQuantizationType):
    """(GGUF name, array, stored type) for every weight, in llama.cpp's layout."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reuses the embedding when output.weight is absent; transformers re-ties it
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise LlmtuneError(f"GGUF export does not know where weight '{key}' goes in a {arch.name} file.")
        data = value.detach().float().cpu().numpy()
        # Hugging Face stores query/key rows per head as [first halves | second halves] (rotate_half RoPE);
        # llama.cpp expects them interleaved pairwise, as Meta's original checkpoints did.
        if key.endswith("q_proj.weight"):
            data = _interleave_rotary_rows(data, config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            data = _interleave_rotary_rows(data, config.num_key_value_heads)
        yield target, *_encode(data, tensor_type)


def _interleave_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _encode(data: np.ndarray, tensor_type: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Norms and other vectors stay float32 (as llama.cpp keeps them); matrices take the chosen type, except
    rows that do not split into whole quantization blocks, which fall back to f16."""
    if data.ndim == 1 or tensor_type == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if tensor_type == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    block, _ = gguf.GGML_QUANT_SIZES[tensor_type]
    if data.shape[-1] % block:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, tensor_type), tensor_type


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int, stop_ids: set[int]) -> None:
    pre_tokenizer = check_tokenizer(tokenizer)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    id_to_token = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in id_to_token:  # embedding rows past the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(id_to_token[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(id_to_token[index])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    adds_bos, adds_eos = _added_special_tokens(tokenizer)
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(adds_eos)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    if tokenizer.chat_template:
        end_of_turn = end_of_turn_token(tokenizer)  # llama.cpp stops on eos and end-of-turn alike
        if end_of_turn != tokenizer.eos_token_id:
            writer.add_eot_token_id(end_of_turn)
        writer.add_chat_template(tokenizer.chat_template)
    elif stop_ids - {tokenizer.eos_token_id}:
        writer.add_eot_token_id(min(stop_ids - {tokenizer.eos_token_id}))


def _added_special_tokens(tokenizer: Any) -> tuple[bool, bool]:
    """Whether the tokenizer puts bos in front / eos at the end of plain text on its own."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a")["input_ids"]
    grew = len(framed) > len(plain)
    return (grew and framed[0] == tokenizer.bos_token_id, grew and framed[-1] == tokenizer.eos_token_id)


def _pre_tokenizer_shape(pre_tokenizer: dict | None) -> str:
    def essential(step: dict) -> dict:
        return {k: v for k, v in step.items() if k in ("type", "use_regex", "individual_digits")}

    if pre_tokenizer is None:
        return "no pre-tokenizer"
    if pre_tokenizer.get("type") == "Sequence":
        return json.dumps([essential(s) for s in pre_tokenizer["pretokenizers"]], sort_keys=True)
    return json.dumps(essential(pre_tokenizer), sort_keys=True)


def verify_gguf(path: Path, model: torch.nn.Module, tokenizer: Any, quant: str, probe: str,
                prompts: list[str] = ()) -> dict[str, Any]:
    """Read the file back with transformers and prove it holds this model; raise if it does not.

    Two comparisons on the probe text: against this model with its weights rounded exactly as the file stores
    them - any difference beyond float32 noise means a wrong layout, config or tokenizer - and against the
    full-precision model, which measures what the chosen precision costs (reported, not judged). With `prompts`,
    both models' greedy replies are compared too (reported: rounding may flip a near-tie and change a reply).
    """
    ids = tokenizer(probe, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        full = model(input_ids=ids).logits[0]
        rounded = _rounded_like_file(model, quant)(input_ids=ids).logits[0]  # the copy is freed right after
    loaded, loaded_tokenizer = load_gguf(path)
    _compare_tokenizers(tokenizer, loaded_tokenizer, probe, ids)
    with torch.inference_mode():
        got = loaded(input_ids=ids).logits[0]
    layout_difference = (got - rounded).abs().max().item()
    allowed = allowed_difference(rounded, 1e-4)
    if layout_difference > allowed:
        raise LlmtuneError(
            f"The GGUF file read back gives logits up to {layout_difference:.2e} away from the same weights in "
            f"{quant} (allowed {allowed:.1e}): its layout or settings are wrong for this model, so it was deleted."
        )
    replies = {}
    if prompts:
        chat = bool(tokenizer.chat_template)
        expected = generate(model, tokenizer, list(prompts), GREEDY_TOKENS, chat)
        exported = generate(loaded, loaded_tokenizer, list(prompts), GREEDY_TOKENS, chat)
        replies = {"greedy_replies": [{"prompt": e["prompt"], "model": e["completion"], "gguf": g["completion"]}
                                      for e, g in zip(expected, exported)],
                   "greedy_replies_equal": sum(e["completion"] == g["completion"] for e, g in zip(expected, exported))}
    return {
        **replies,
        "probe_tokens": int(ids.shape[1]),
        "max_logit_diff_vs_stored_weights": layout_difference,
        "max_logit_diff_vs_full_precision": (got - full).abs().max().item(),
        "max_abs_logit": full.abs().max().item(),
        "top1_agreement_vs_full_precision": (got.argmax(-1) == full.argmax(-1)).float().mean().item(),
    }


def _compare_tokenizers(expected: Any, got: Any, probe: str, ids: torch.Tensor) -> None:
    differences = []
    got_ids = got(probe, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if not torch.equal(ids, got_ids):
        differences.append(f"the probe text becomes {got_ids.shape[1]} tokens instead of {ids.shape[1]}")
    for kind in ("bos", "eos", "pad", "unk"):
        if getattr(expected, f"{kind}_token_id") != getattr(got, f"{kind}_token_id"):
            differences.append(f"{kind} token id {getattr(got, f'{kind}_token_id')} instead of "
                               f"{getattr(expected, f'{kind}_token_id')}")
    if got.chat_template != expected.chat_template:
        differences.append("the chat template differs")
    if differences:
        raise LlmtuneError("The GGUF file's tokenizer, read back, differs from the run's: " + "; ".join(differences)
                           + ". The file was deleted.")


def _rounded_like_file(model: torch.nn.Module, quant: str) -> torch.nn.Module:
    """A copy of `model` whose weights went through the same rounding the GGUF file applies."""
    import copy

    tensor_type = QUANTS[quant][0]
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in rounded.parameters():
            data, kind = _encode(parameter.detach().float().numpy(), tensor_type)
            parameter.copy_(torch.from_numpy(gguf.quants.dequantize(data, kind).reshape(parameter.shape)))
    return rounded.eval()
