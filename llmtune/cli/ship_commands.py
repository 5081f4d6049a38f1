"""The commands that take a trained model to where it is used: serve (and its argument parser)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from llmtune.errors import LlmtuneError

API_KEY_ENV = "LLMTUNE_API_KEY"


def add_ship_commands(commands: Any) -> None:
    serve = commands.add_parser(
        "serve", help="Serve a run or model over HTTP (OpenAI-compatible; /v1/classify for classifiers).",
        description="Causal LMs: /v1/chat/completions (stream: true for server-sent events), /v1/completions and "
        "/v1/models, with the run's chat template, stop tokens and precision; an adapter is served on its base. "
        "Classifiers: /v1/classify. One request generates at a time; the others wait their turn. Ctrl-C stops it.")
    serve.add_argument("run", help="Run directory, checkpoint folder, or model (Hub id, local folder, .gguf).")
    serve.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: this machine only).")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help=f"Require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set). "
                       f"Prefer the environment variable: command lines are visible to other users.")
    serve.add_argument("--name", help="Model id clients ask for (default: the run folder's name).")
    serve.add_argument("--max-tokens", type=int, default=1024, help="The most new tokens one request may ask for.")
    serve.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="Compute precision (auto: the run's evaluation precision).")
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from llmtune.cli.loaders import load_classifier, load_lm
    from llmtune.models.trained import model_kind
    from llmtune.ship.serve import LanguageModel, Limits, TextClassifier, serve

    if args.max_tokens < 1:
        raise LlmtuneError(f"--max-tokens must be at least 1; got {args.max_tokens}.")
    if not 0 < args.port < 65536:
        raise LlmtuneError(f"--port must be between 1 and 65535; got {args.port}.")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if model_kind(args.run) == "classification":
        classifier = load_classifier(args, "serve")
        engine: Any = TextClassifier(classifier.predict, classifier.labels)
    else:
        model, tokenizer, chat, precision = load_lm(args, "serve")
        engine = LanguageModel(model, tokenizer, chat, precision)
    name = args.name or Path(str(args.run).rstrip("/")).name
    serve(engine, name, args.host, args.port, api_key, Limits(max_tokens=args.max_tokens))
    return 0
