"""Loading a trained run for use (eval, predict, generate, chat, serve, the Python API), refusing a run of the wrong
kind - and a RUN that does not exist - before any weights load."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.config.loader import expand_home
from llmtune.config.vocab import PRECISIONS
from llmtune.errors import LlmtuneError


def check_run_argument(run: str | Path) -> None:
    """A RUN that reads as a local path (`runs/x`, `./x`, `/abs/x`) but is not there is refused here, naming the
    runs that are, instead of being looked up on the Hub. A bare `owner/name` whose first part is no local
    folder stays a Hub id."""
    path = expand_home(str(run))
    if path.exists():
        return
    text = str(run)
    local = path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or path.parent.is_dir() and (
        path.parent != Path("."))
    if not local:
        return
    parent = next((p for p in path.parents if p.is_dir()), Path("."))
    runs = sorted(child.name for child in parent.iterdir() if child.is_dir() and (child / "run.json").is_file())[:8]
    there = f" Runs in '{parent}': {', '.join(runs)}." if runs else ""
    raise LlmtuneError(
        f"'{run}' does not exist: no run, checkpoint or model folder there.{there} Give a run directory (as `llmtune "
        "train` printed it), one of its checkpoint-N folders, a saved model folder, a .gguf file, or a Hub id."
    )


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise LlmtuneError(f"precision is {precision!r}; it must be one of {', '.join(PRECISIONS)} "
                           "(auto: the run's own evaluation precision, from run.json).")


def require_kind(run: str | Path, wanted: str, command: str) -> None:
    """Refuse a run of the wrong kind before loading it, naming the command that fits it."""
    from llmtune.inference.trained import model_kind

    check_run_argument(run)
    kind = model_kind(run)
    if kind is None or kind == wanted:
        return
    if kind == "image_classification":
        raise LlmtuneError(
            f"'{run}' is an image classifier; `llmtune {command}` works on text models. Use `llmtune predict {run} "
            "--image FILE` or `llmtune eval RUN --data FOLDER`."
        )
    if wanted == "causal_lm":
        raise LlmtuneError(
            f"'{run}' is a {kind} run; `llmtune {command}` needs a causal language model (task sft or pretrain). "
            f"For a classifier use `llmtune predict {run} --text \"...\"` or `llmtune eval {run} --data FILE`."
        )
    raise LlmtuneError(
        f"'{run}' is a causal language model; `llmtune {command}` needs a classification run. Use "
        f"`llmtune generate {run} --prompt \"...\"`, `llmtune chat {run}`, or `llmtune eval {run} --text-file FILE` "
        "(perplexity)."
    )


def is_image_run(run: str | Path) -> bool:
    from llmtune.inference.trained import model_kind

    return model_kind(run) == "image_classification"


def load_classifier(run: str | Path, command: str, precision: str = "auto",
                    columns: dict[str, str | None] | None = None) -> Any:
    """A run's text classifier in PyTorch, or onnxruntime for a folder `llmtune export --format onnx` wrote.
    `columns` (text / text_pair / label) replace the ones the run was trained with."""
    from llmtune.inference.classifier import Classifier
    from llmtune.inference.onnx_classifier import MODEL_FILE, load_onnx_classifier

    check_precision(precision)
    require_kind(run, "classification", command)
    if (Path(run) / MODEL_FILE).is_file():
        if precision not in ("auto", "fp32"):
            raise LlmtuneError(f"'{run}' is an ONNX export, which computes in float32; precision {precision} does "
                               "not apply to it. Leave precision out (auto).")
        classifier = load_onnx_classifier(Path(run))
    else:
        classifier = Classifier.load(run, precision)
    classifier.columns.update({key: value for key, value in (columns or {}).items() if value})
    return classifier


def load_image_classifier(run: str | Path, command: str, precision: str = "auto") -> Any:
    """A run's image classifier; a text run is refused with the command that fits it."""
    from llmtune.inference.image_classifier import ImageClassifier

    check_precision(precision)
    check_run_argument(run)
    if not is_image_run(run):
        raise LlmtuneError(
            f"'{run}' is not an image classification run, so `llmtune {command}` does not apply. For a text "
            f"classifier use `llmtune predict {run} --text \"...\"`."
        )
    return ImageClassifier.load(run, precision)


@dataclass
class LanguageModel:
    """A causal LM loaded for use: the model (an adapter on its base), its tokenizer, whether prompts go through
    the chat template, and the compute precision (the run's evaluation precision unless asked otherwise)."""

    model: Any
    tokenizer: Any
    chat: bool
    precision: str

    @property
    def context(self) -> int:
        """The longest sequence the model takes (prompt plus reply), in tokens."""
        return int(getattr(self.model.config, "max_position_embeddings", 0) or self.tokenizer.model_max_length)

    @contextmanager
    def computing(self) -> Iterator[None]:
        """Inference in the model's precision (autocast where it is not fp32)."""
        from llmtune.run.precision import evaluation_precision

        with evaluation_precision(self.precision, self.model.device.type):
            yield

    def generate(self, prompts: list[str] | list[list[dict[str, str]]], max_new_tokens: int = 128,
                 ) -> list[dict[str, Any]]:
        """Greedy replies (a prompt is a user message, or a whole message list, with the chat template)."""
        from llmtune.inference.generation import generate

        with self.computing():
            return generate(self.model, self.tokenizer, prompts, max_new_tokens, self.chat)

    def perplexity(self, text: str, max_length: int = 1024, stride: int | None = None) -> dict[str, Any]:
        """Sliding-window perplexity of `text`."""
        from llmtune.inference.generation import perplexity

        with self.computing():
            return {**perplexity(self.model, self.tokenizer, text, max_length, stride), "computed_in": self.precision}


def load_language_model(run: str | Path, command: str, precision: str = "auto", raw: bool = False) -> LanguageModel:
    """A causal-LM run or model ready to generate; `raw` continues prompt text without the chat template."""
    from transformers import AutoModelForCausalLM

    from llmtune.inference.trained import load_trained

    check_precision(precision)
    require_kind(run, "causal_lm", command)
    model, tokenizer, record = load_trained(run, AutoModelForCausalLM)
    chat = bool(tokenizer.chat_template) and not raw
    if precision == "auto":
        precision = record.get("precision", {}).get("evaluation", "fp32")
    return LanguageModel(model, tokenizer, chat, precision)
