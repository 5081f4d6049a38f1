"""Loading a trained run for the commands that use one (eval, predict, generate, chat, serve), refusing a run of
the wrong kind before any weights load."""

from __future__ import annotations

import argparse

from llmtune.errors import LlmtuneError


def require_kind(run: str, wanted: str, command: str) -> None:
    """Refuse a run of the wrong kind before loading it, naming the command that fits it."""
    from llmtune.inference.trained import model_kind

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


def load_classifier(args: argparse.Namespace, command: str):
    """A run's classifier in PyTorch, or onnxruntime for a folder `llmtune export --format onnx` wrote."""
    from pathlib import Path

    from llmtune.inference.classifier import Classifier
    from llmtune.inference.onnx_classifier import MODEL_FILE, load_onnx_classifier

    require_kind(args.run, "classification", command)
    if (Path(args.run) / MODEL_FILE).is_file():
        if getattr(args, "precision", "auto") not in ("auto", "fp32"):
            raise LlmtuneError(f"'{args.run}' is an ONNX export, which computes in float32; --precision "
                               f"{args.precision} does not apply to it. Leave --precision out.")
        classifier = load_onnx_classifier(Path(args.run))
    else:
        classifier = Classifier.load(args.run, args.precision)
    for key in ("text", "text_pair", "label"):
        value = getattr(args, f"{key}_column", None)
        if value:
            classifier.columns[key] = value
    return classifier


def is_image_run(run: str) -> bool:
    from llmtune.inference.trained import model_kind

    return model_kind(run) == "image_classification"


def load_image_classifier(args: argparse.Namespace, command: str):
    """A run's image classifier; a text run is refused with the command that fits it."""
    from llmtune.inference.image_classifier import ImageClassifier

    if not is_image_run(args.run):
        raise LlmtuneError(
            f"'{args.run}' is not an image classification run, so `llmtune {command}` does not apply. For a text "
            f"classifier use `llmtune predict {args.run} --text \"...\"`."
        )
    if getattr(args, "text", None):
        raise LlmtuneError(f"'{args.run}' classifies images: give --image FILE (or --file with image paths), not --text.")
    return ImageClassifier.load(args.run, args.precision)


def load_lm(args: argparse.Namespace, command: str):
    """(model, tokenizer, whether to apply the chat template, compute precision) of a causal-LM run or model."""
    from transformers import AutoModelForCausalLM

    from llmtune.inference.trained import load_trained

    require_kind(args.run, "causal_lm", command)
    model, tokenizer, record = load_trained(args.run, AutoModelForCausalLM)
    chat = bool(tokenizer.chat_template) and not getattr(args, "raw", False)
    precision = record.get("precision", {}).get("evaluation", "fp32") if args.precision == "auto" else args.precision
    return model, tokenizer, chat, precision
