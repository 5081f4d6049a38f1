"""What a completion earns in task grpo: the recipe's rl.rewards as the reward callables trl's GRPOTrainer calls,
and the ledger that writes every scored completion to completions.jsonl in the run directory.

A reward is a built-in or user function (llmtune/rewards/), an llmtune classification run (the probability of
one label, judged on the completion alone) or an llmtune reward run (its score of prompt + completion). Each
callable checks what its function returned - one number (or None) per completion - and turns a failure into
one paragraph naming the reward.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmtune.data.preference import as_text
from llmtune.errors import LlmtuneError
from llmtune.rewards.builtin import bind, load_function, text_of
from llmtune.run.distributed import is_main_process
from llmtune.run.files import write_text

Scorer = Callable[..., list[float | None]]


def reward_name(item: dict[str, Any]) -> str:
    """A reward's name in logs and metrics: its `name`, else the function's, the label's or 'reward_model'."""
    if item.get("name"):
        return str(item["name"])
    if item.get("function"):
        return str(item["function"]).rsplit(":", 1)[-1]
    return f"{item['label']}" if item.get("classifier") else "reward_model"


def reward_names(items: Sequence[dict[str, Any]]) -> list[str]:
    """Each reward's name, made unique with a number where two share one."""
    names: list[str] = []
    for item in items:
        name = reward_name(item)
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


def check_rewards(items: Sequence[dict[str, Any]]) -> None:
    """Each reward's file and function, or run of the right kind, exists - checked before any model loads."""
    from llmtune.inference.loading import require_kind
    from llmtune.inference.trained import model_kind

    for i, item in enumerate(items):
        where = f"rl.rewards[{i}]"
        if item.get("function"):
            load_function(item["function"], f"'{where}.function'")
        run = item.get("classifier") or item.get("reward_model")
        if run and not Path(run).is_dir():
            raise LlmtuneError(f"'{where}' names the run '{run}', which is not a folder. Give the directory of a "
                               "finished llmtune run (its output.dir).")
        if item.get("classifier"):
            require_kind(run, "classification", f"train ({where}.classifier)")
        elif run and model_kind(Path(run)) != "reward":
            raise LlmtuneError(f"'{where}.reward_model' is '{run}', which is not an llmtune reward run (task reward). "
                               "Give a reward run's directory, or use {classifier: RUN, label: NAME} for a "
                               "classification run.")


def build_scorer(item: dict[str, Any], where: str, max_completion_length: int, precision: str) -> Scorer:
    """The recipe's reward item as a function(completions, prompts=..., completion_ids=..., **columns)."""
    if item.get("function"):
        params = {k: item[k] for k in ("pattern", "full", "max_length", "cache") if k in item}
        if item["function"] == "soft_overlong":
            params.setdefault("max_length", max_completion_length)
        return bind(load_function(item["function"], f"'{where}.function'"), params)
    if item.get("classifier"):
        return classifier_scorer(item["classifier"], str(item["label"]), where, precision)
    return reward_model_scorer(item["reward_model"], where, precision)


def classifier_scorer(run: str, label: str, where: str, precision: str) -> Scorer:
    """The probability an llmtune classification run gives `label`, on the completion's text alone."""
    from llmtune.inference.loading import load_classifier

    classifier = load_classifier(run, f"{where} (classifier)", precision)
    if label not in classifier.labels:
        raise LlmtuneError(f"'{where}.label' is {label!r}, but the classifier run '{run}' has the labels "
                           f"{', '.join(map(repr, classifier.labels))}. Name one of them.")
    column = classifier.labels.index(label)

    def score(completions: Sequence[Any], **_: Any) -> list[float | None]:
        texts = [text_of(c) for c in completions]
        return [float(p) for p in classifier.probabilities(texts)[:, column]]

    return score


def reward_model_scorer(run: str, where: str, precision: str) -> Scorer:
    """An llmtune reward run's score of prompt + completion, encoded exactly as that run was trained
    (tasks/reward.py's reply_ids: the chat template for a decoder, a text pair for an encoder)."""
    import torch

    from llmtune.inference.classifier import Classifier
    from llmtune.run.precision import evaluation_precision
    from llmtune.tasks.reward import reply_ids

    scorer = Classifier.load(run, precision)

    def score(completions: Sequence[Any], prompts: Sequence[Any], **_: Any) -> list[float | None]:
        conversations = [p if isinstance(p, list) else [{"role": "user", "content": str(p)}] for p in prompts]
        rows = [{"input_ids": reply_ids(scorer.tokenizer, c, [{"role": "assistant", "content": text_of(r)}],
                                        scorer.max_length)} for c, r in zip(conversations, completions)]
        values: list[float | None] = []
        for start in range(0, len(rows), scorer.batch_size):
            batch = scorer.tokenizer.pad(rows[start:start + scorer.batch_size], return_tensors="pt")
            with torch.inference_mode(), evaluation_precision(scorer.precision, scorer.model.device.type):
                logits = scorer.model(**batch.to(scorer.model.device)).logits
            values += [float(v) for v in logits[:, 0].float()]
        return values

    return score


class CompletionLedger:
    """Collects each reward's scores of one generation batch; after the last reward, appends one JSON line per
    completion to completions.jsonl (all processes' rows, written by the main one): step, split, prompt,
    completion, each reward, the weighted total, and the row's constraints where it has them."""

    def __init__(self, path: Path, names: list[str], weights: list[float]) -> None:
        self.path, self.names, self.weights = path, names, weights
        self.scores: dict[str, list[float | None]] = {}
        self.trainer: Any = None  # set once trl's trainer exists: which step, training or evaluating

    def reward(self, name: str, scorer: Scorer, where: str) -> Callable[..., list[float | None]]:
        """trl's reward callable for one recipe reward."""
        def call(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], **columns: Any
                 ) -> list[float | None]:
            for private in ("trainer_state", "log_extra", "log_metric", "environments"):
                columns.pop(private, None)
            texts = [text_of(c) for c in completions]  # chat completions come as [{"role", "content"}]: the text
            scores = call_reward(scorer, name, where, texts, prompts=prompts, completion_ids=completion_ids,
                                 **columns)
            self.scores[name] = scores
            if name == self.names[-1]:
                self.write(prompts, completions, columns.get("constraints"))
            return scores

        call.__name__ = name  # trl logs each reward under its callable's name
        return call

    def keep_until(self, step: int) -> None:
        """On --resume from checkpoint-`step`: drop the rows of the steps after it, which are trained again (the
        file is rewritten whole, so a crash leaves the old one)."""
        if not self.path.exists() or not is_main_process():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if (row := _row(line)) and row["step"] <= step]
        if len(kept) < len(lines):
            write_text(self.path, "".join(kept))

    def write(self, prompts: list[Any], completions: list[Any], constraints: list[Any] | None) -> None:
        from accelerate.utils import gather_object

        state = self.trainer.state if self.trainer is not None else None
        training = self.trainer is None or self.trainer.model.training
        rows = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            scores = {name: self.scores[name][i] for name in self.names}
            total = weighted_total(self.weights, list(scores.values()))
            rows.append({"step": (state.global_step + 1 if training else state.global_step) if state else 0,
                         "split": "train" if training else "eval", "prompt": prompt_text(prompt),
                         "completion": text_of(completion), "rewards": scores, "reward": total})
            if constraints is not None:  # what the constraints rewards checked, to audit a score by hand
                rows[-1]["constraints"] = [{k: v for k, v in c.items() if v is not None} for c in constraints[i] or []]
        self.scores = {}
        if self.trainer is not None and self.trainer.accelerator.num_processes > 1:
            rows = gather_object(rows)
            if not self.trainer.accelerator.is_main_process:
                return
        with self.path.open("a", encoding="utf-8") as handle:  # appended and flushed: readable while training
            handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _row(line: str) -> dict[str, Any] | None:
    """One ledger line, or None for a blank one or one a crash cut short."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def call_reward(scorer: Scorer, name: str, where: str, texts: list[str], **arguments: Any) -> list[float | None]:
    """One reward on a batch of completion texts, its output checked; its failure one paragraph naming it."""
    try:
        scores = scorer(texts, **arguments)
    except LlmtuneError:
        raise
    except Exception as exc:  # the user's function: its error in one paragraph, named
        raise LlmtuneError(f"Reward {name!r} ({where}) raised {type(exc).__name__}: {exc}. It is called as "
                           "function(completions=[texts], prompts=[conversations], completion_ids=[...], "
                           "<column>=[...]) and returns one number (or None) per completion.") from exc
    return checked(scores, len(texts), name, where)


def weighted_total(weights: list[float], scores: list[float | None]) -> float | None:
    """The rewards summed with their weights, as trl sums them (a reward that did not judge adds nothing); None
    when no reward judged the completion (trl leaves such a completion out of its mean)."""
    judged = [(w, s) for w, s in zip(weights, scores) if s is not None]
    return sum(w * s for w, s in judged) if judged else None


def prompt_text(prompt: Any) -> str:
    """The prompt as one string for the log: a conversation's last user turn (the system prompt is in the recipe)."""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]["content"]) if users else as_text(prompt)
    return str(prompt)


def checked(scores: Any, expected: int, name: str, where: str) -> list[float | None]:
    """A reward's output as floats, or one paragraph on what is wrong with it."""
    if not isinstance(scores, (list, tuple)) or len(scores) != expected:
        got = f"{len(scores)} values" if isinstance(scores, (list, tuple)) else repr(type(scores).__name__)
        raise LlmtuneError(f"Reward {name!r} ({where}) returned {got} for {expected} completions; a reward function "
                           "returns a list with one number (or None) per completion, in order.")
    out: list[float | None] = []
    for value in scores:
        if value is None:
            out.append(None)
            continue
        try:
            number = float(value)  # ints, floats, bools (a check's True is 1), numpy and torch scalars
        except (TypeError, ValueError):
            number = None
        if number is None or isinstance(value, str) or math.isinf(number):
            raise LlmtuneError(f"Reward {name!r} ({where}) returned {value!r} for a completion; rewards are finite "
                               "numbers (or None where the function does not judge that completion).")
        out.append(None if math.isnan(number) else number)
    return out
