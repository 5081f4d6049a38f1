"""The speed benchmark's held-out evaluator: one per workload, the same for every system, run on the trained model
after the same number of effective tokens (benchmarks/speed_run.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from speed_workloads import SFT_WORKLOADS, alpaca_messages


def held_out(workload: str, model, tokenizer, work: Path, max_length: int, beta: float = 0.1) -> dict[str, float]:
    import torch

    model.eval()
    with torch.no_grad():
        if workload in SFT_WORKLOADS:
            return {"held_out_loss": _answer_loss(model, tokenizer, work / "eval.json", max_length)}
        if workload == "sst2":
            return _classification_loss(model, tokenizer, work / "eval.tsv", max_length)
        if workload == "dpo":
            return _preference_accuracy(model, tokenizer, work / "eval.jsonl", max_length, beta)
        return {"held_out_loss": _text_loss(model, tokenizer, work / "eval.txt", max_length)}


def _ids(encoded) -> list[int]:
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded


def _answer_loss(model, tokenizer, eval_file: Path, max_length: int) -> float:
    """Mean loss per answer token on held-out Alpaca examples."""
    import torch

    total, count = 0.0, 0
    for row in json.loads(eval_file.read_text()):
        messages = alpaca_messages(row)
        prompt = _ids(tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True))
        full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))[:max_length]
        labels = ([-100] * len(prompt) + full[len(prompt):])[: len(full)]
        out = model(input_ids=torch.tensor([full], device=model.device),
                    labels=torch.tensor([labels], device=model.device), use_cache=False)
        answer_tokens = sum(1 for t in labels[1:] if t != -100)
        total += out.loss.item() * answer_tokens
        count += answer_tokens
    return total / count


def _preference_accuracy(model, tokenizer, eval_file: Path, max_length: int, beta: float,
                         pairs: int = 60) -> dict[str, float]:
    """On held-out pairs: the share whose implicit reward (policy minus reference log-probability of the reply,
    the reference being the policy with its adapter off) is higher for the chosen reply; as held-out loss, the
    mean DPO loss at the recipe's beta."""
    import torch

    def reply_logp(prompt: list, reply: list) -> float:
        start = _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
        ids = _ids(tokenizer.apply_chat_template(prompt + reply, tokenize=True))[:max_length]
        logits = model(input_ids=torch.tensor([ids], device=model.device), use_cache=False).logits
        logits = logits[0, len(start) - 1:-1].float()
        targets = torch.tensor(ids[len(start):], device=model.device)
        return logits.log_softmax(-1).gather(-1, targets[:, None]).sum().item()

    correct, losses = 0, []
    rows = [json.loads(line) for line in eval_file.read_text().splitlines()[:pairs]]
    for row in rows:
        margins = {}
        for side in ("chosen", "rejected"):
            policy = reply_logp(row["prompt"], row[side])
            with model.disable_adapter():
                margins[side] = policy - reply_logp(row["prompt"], row[side])
        correct += margins["chosen"] > margins["rejected"]
        losses.append(-torch.nn.functional.logsigmoid(torch.tensor(beta * (margins["chosen"] - margins["rejected"]))))
    return {"held_out_loss": float(torch.stack(losses).mean()), "held_out_accuracy": correct / len(rows)}


def _classification_loss(model, tokenizer, eval_file: Path, max_length: int) -> dict[str, float]:
    import torch

    rows = [line.rsplit("\t", 1) for line in eval_file.read_text().splitlines()[1:]]
    losses, correct = [], 0
    for start in range(0, len(rows), 64):
        chunk = rows[start:start + 64]
        batch = tokenizer([s for s, _ in chunk], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt").to(model.device)
        labels = torch.tensor([int(label) for _, label in chunk], device=model.device)
        logits = model(**batch).logits
        losses.append(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item())
        correct += int((logits.argmax(-1) == labels).sum())
    return {"held_out_loss": sum(losses) / len(rows), "held_out_accuracy": correct / len(rows)}


def _text_loss(model, tokenizer, eval_file: Path, block: int) -> float:
    """Mean loss on held-out blocks made the way both systems make training blocks (each non-empty line and an
    end-of-text token, concatenated), over the text's own tokens: the plain script's collator never trains the
    end-of-text token (it is also the pad token, so its labels are masked), so predicting it is not scored."""
    import torch

    eos = tokenizer.eos_token_id
    lines = [line for line in eval_file.read_text().splitlines() if line]
    ids = [t for line in lines for t in tokenizer(line, add_special_tokens=False)["input_ids"] + [eos]]
    blocks = torch.tensor([ids[i:i + block] for i in range(0, len(ids) - block + 1, block)][:64], device=model.device)
    out = model(input_ids=blocks, labels=blocks.masked_fill(blocks == eos, -100), use_cache=False)
    return out.loss.item() if math.isfinite(out.loss.item()) else float("nan")
