"""The commands that take a trained model to where it is used: merge, push, serve and export (with their argument
parsers)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from llmtune.config.vocab import PRECISIONS

API_KEY_ENV = "LLMTUNE_API_KEY"


def add_ship_commands(commands: Any) -> None:
    merge = commands.add_parser(
        "merge",
        help="Merge a LoRA/DoRA adapter into a full-precision copy of its base.",
        description="Merge the adapter of a run (or checkpoint / adapter folder) into its base, reloaded in full "
        "precision even when training quantized it; check that merged logits match adapter-on-base; save "
        "safetensors, tokenizer and generation config.",
    )
    merge.add_argument("run", help="A run directory, a checkpoint-N folder or an adapter folder.")
    merge.add_argument("--out", required=True, help="Folder for the merged model (must be new or empty).")
    merge.add_argument("--base", help="Base checkpoint to merge into (default: the one the run trained on).")
    merge.add_argument("--dtype", default="float32", help="dtype of the saved weights: float32, bfloat16, float16.")
    merge.add_argument("--tolerance", type=float, default=1e-4,
                       help="Largest allowed logit difference, relative to the largest logit (at least 1).")
    merge.add_argument("--overwrite", action="store_true", help="Replace the files already in --out.")
    merge.set_defaults(handler=_merge)

    push = commands.add_parser(
        "push",
        help="Publish a run to the Hugging Face Hub with a model card.",
        description="Upload a run's adapter (or merged / full model), tokenizer, recipe and a generated model card "
        "in one commit. The token comes from `hf auth login` or HF_TOKEN; HF_ENDPOINT selects a private hub.",
    )
    push.add_argument("run", help="A run directory.")
    push.add_argument("--repo-id", required=True, help="Hub repo to create or update, e.g. me/my-model.")
    push.add_argument("--private", action="store_true", help="Create the repo as private.")
    push.add_argument("--merged", action="store_true", help="Merge the adapter into its base and push the full model.")
    push.set_defaults(handler=_push)

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
    serve.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="Compute precision (auto: the run's evaluation precision).")
    serve.set_defaults(handler=_serve)

    export = commands.add_parser(
        "export", help="Export a run as GGUF (llama.cpp), GGUF + Ollama Modelfile, or ONNX (classifiers).",
        description="Writes the merged model with its tokenizer, chat template and stop tokens (gguf, ollama) or "
        "an onnxruntime classifier with its tokenizer and labels (onnx) under RUN/export/, reads the file back "
        "and compares it with the run's model, and keeps it only if it matches. run.json records the export.")
    export.add_argument("run", help="Run directory (or one of its checkpoint-N folders, or a saved model folder).")
    export.add_argument("--format", required=True, choices=["gguf", "ollama", "onnx"],
                        help="gguf: one .gguf file; ollama: the .gguf plus a Modelfile beside it; onnx: a folder "
                        "with model.onnx for `llmtune predict`.")
    export.add_argument("--quant", choices=["f32", "f16", "bf16", "q8_0"],
                        help="GGUF weight type (default f16; q8_0 is half the size, f32 exact).")
    export.add_argument("--out", help="Folder to write into (default: RUN/export).")
    export.add_argument("--overwrite", action="store_true", help="Replace an earlier export of the same name.")
    export.set_defaults(handler=_export)


def _serve(args: argparse.Namespace) -> int:
    from llmtune import api

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    api.serve(args.run, args.host, args.port, api_key, args.name, args.max_tokens, args.precision)
    return 0


def _export(args: argparse.Namespace) -> int:
    from llmtune import api

    result = api.export(args.run, args.format, args.quant, args.out, args.overwrite)
    for file in result.files:
        print(f"Wrote {file}")
    checks = result.checks
    if args.format == "onnx":
        print(f"Checked: onnxruntime's probabilities are within {checks['max_probability_diff']:.1e} of PyTorch's "
              f"on {checks['probe_texts']} probe texts.")
        print(f"Use it: llmtune predict {result.files[0]} --text \"...\"")
        return 0
    print(f"Checked: read back by transformers, its logits equal the run's model with the same rounding "
          f"(max diff {checks['max_logit_diff_vs_stored_weights']:.1e}); against full precision the max diff is "
          f"{checks['max_logit_diff_vs_full_precision']:.2e} and the top token agrees on "
          f"{checks['top1_agreement_vs_full_precision']:.0%} of {checks['probe_tokens']} probe positions; greedy "
          f"replies to {len(checks['greedy_replies'])} prompts: {checks['greedy_replies_equal']} identical "
          f"(run.json lists them).")
    if args.format == "ollama":
        print(f"Use it: cd {result.files[-1].parent} && ollama create {result.name} -f {result.files[-1].name}")
    else:
        print(f"Use it: llama-cli -m {result.files[0]} -cnv (or llmtune serve {result.files[0]})")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from llmtune import api

    result = api.merge(args.run, args.out, base=args.base, dtype=args.dtype, tolerance=args.tolerance,
                       overwrite=args.overwrite)
    print(json.dumps({"out": str(result.out), "base": result.base,
                      "max_logit_difference": result.max_logit_difference}, indent=2))
    return 0


def _push(args: argparse.Namespace) -> int:
    from llmtune import api

    print(api.push(args.run, args.repo_id, private=args.private, merged=args.merged))
    return 0
