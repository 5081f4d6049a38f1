"""Generation and perplexity for causal LMs: quick checks during training and from the CLI."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback

from llmtune.data.lm_tokenize import end_of_turn_token

logger = logging.getLogger(__name__)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str] | list[list[dict[str, str]]],
    max_new_tokens: int,
    chat: bool,
) -> list[dict[str, Any]]:
    """Greedy continuations. With chat=True a prompt is a user message (or a whole message list).

    Each record says whether generation stopped on its own (an eos / end-of-turn token) or ran out of tokens.
    """
    was_training = model.training
    model.eval()
    stop_ids = stop_token_ids(model)
    records = []
    for prompt in prompts:
        inputs = encode_prompt(tokenizer, prompt, chat).to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        new = output[0, inputs["input_ids"].shape[1]:].tolist()
        stopped = bool(new) and new[-1] in stop_ids
        records.append({
            "prompt": prompt,
            "completion": tokenizer.decode(new, skip_special_tokens=True),
            "stopped": stopped,
            "new_tokens": len(new),
        })
    model.train(was_training)
    return records


@torch.inference_mode()
def replies(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, str]]],
            max_new_tokens: int, samples: int = 0, temperature: float = 1.0, top_p: float = 1.0,
            batch_rows: int = 64, progress: str | None = None, **sampling: Any) -> list[list[dict[str, Any]]]:
    """Replies to each conversation in the chat template, many prompts per left-padded batch of about `batch_rows`
    sequences: the greedy one (samples=0), or `samples` sampled ones (`sampling`: more generate options, e.g.
    top_k=0). Each reply: {"text", "ids", "stopped"} (stopped on its own, not cut). `progress`: a bar's title.

    Decoding a small model on a CPU is bound by reading the weights, not by the rows: SmolLM2-135M decodes 64 rows
    x 64 tokens in 2x the time of 16 rows (fp32, 2-core EPYC), so batches are counted in rows, not prompts."""
    from tqdm.auto import tqdm

    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    stop_ids = stop_token_ids(model)
    options = {"do_sample": True, "temperature": temperature, "top_p": top_p, "num_return_sequences": samples,
               **sampling} if samples else {"do_sample": False}
    out: list[list[dict[str, Any]]] = []
    try:
        bar = tqdm(total=len(conversations), desc=progress, unit="prompt", disable=progress is None)
        batch_size = max(1, batch_rows // max(samples, 1))
        for start in range(0, len(conversations), batch_size):
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in conversations[start:start + batch_size]]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                       **options)[:, inputs["input_ids"].shape[1]:]
            rows = [_reply(ids.tolist(), tokenizer, stop_ids) for ids in generated]
            per = max(samples, 1)
            out += [rows[i:i + per] for i in range(0, len(rows), per)]
            bar.update(len(texts))
        bar.close()
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return out


def _reply(ids: list[int], tokenizer: PreTrainedTokenizerBase, stop_ids: set[int]) -> dict[str, Any]:
    """One generated row: its tokens up to and including the first stop token (padding after it dropped)."""
    end = next((i + 1 for i, t in enumerate(ids) if t in stop_ids), len(ids))
    kept = ids[:end]
    return {"text": tokenizer.decode(kept, skip_special_tokens=True), "ids": kept, "stopped": end < len(ids) or
            (bool(kept) and kept[-1] in stop_ids)}


def stop_token_ids(model: torch.nn.Module) -> set[int]:
    """The tokens generation stops on (eos / end-of-turn, one or several in the generation config)."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict[str, str]], chat: bool) -> Any:
    """Token ids of a prompt as the model saw prompts in training: with chat=True a user message (or a whole
    message list) in the chat template, ready for the assistant's reply; otherwise the text as it is."""
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    return tokenizer(text, return_tensors="pt", add_special_tokens=not chat)


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, text: str, max_length: int, stride: int | None = None
) -> dict[str, float]:
    """Sliding-window perplexity of a text: windows of max_length tokens, each scoring only its new tokens.

    With stride < max_length every scored token sees at least max_length - stride tokens of context.
    """
    stride = stride or max_length
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    total = ids.size(1)
    nll_sum, scored, previous_end = 0.0, 0, 0
    was_training = model.training
    model.eval()
    for begin in range(0, total, stride):
        end = min(begin + max_length, total)
        new_tokens = end - previous_end  # tokens of this window not scored by an earlier one
        window = ids[:, begin:end]
        logits = model(input_ids=window).logits[0, :-1].float()
        targets = window[0, 1:]
        first = max(targets.size(0) - new_tokens, 0)  # the very first token of the text has no prediction
        losses = torch.nn.functional.cross_entropy(logits[first:], targets[first:], reduction="sum")
        nll_sum += losses.item()
        scored += targets.size(0) - first
        previous_end = end
        if end == total:
            break
    model.train(was_training)
    loss = nll_sum / max(scored, 1)
    return {"perplexity": math.exp(loss), "loss": loss, "tokens": scored}


def set_generation_eos(model: Any, tokenizer: Any, chat: bool) -> None:
    """Make generation stop where training taught the model to stop: the template's end-of-turn token."""
    stop = [end_of_turn_token(tokenizer)] if chat else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop:
        stop.append(tokenizer.eos_token_id)
    model.generation_config.eos_token_id = stop[0] if len(stop) == 1 else stop
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # The model config agrees with the tokenizer too; otherwise the Trainer "aligns" them and puts the
    # tokenizer's eos in front of the end-of-turn token.
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id


class GenerationLogger(TrainerCallback):
    """Greedy generations for a fixed prompt list at every evaluation, appended to generations.jsonl."""

    def __init__(self, path: Path, prompts: list[str], max_new_tokens: int, chat: bool):
        self.path, self.prompts, self.max_new_tokens, self.chat = path, prompts, max_new_tokens, chat

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        if model is None or processing_class is None or not state.is_world_process_zero:
            return
        records = generate(model, processing_class, self.prompts, self.max_new_tokens, self.chat)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            for record in records:
                handle.write(json.dumps({"step": state.global_step, **record}) + "\n")
        for record in records:
            logger.info("step %d | %s -> %r%s", state.global_step, record["prompt"], record["completion"][:120],
                        "" if record["stopped"] else " [no stop]")

