"""The commands that use a trained run: eval, predict, generate and chat (and their argument parsers)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llmtune.config.vocab import CLASSIFICATION_METRICS, PRECISIONS
from llmtune.errors import LlmtuneError

PRECISION_HELP = "Compute precision: auto is the run's own evaluation precision (run.json), fp32 for other models."


def add_use_commands(commands: Any) -> None:
    lm_commands = {
        "generate": "Generate from a causal-LM run (adapter or merged) or model for one or more prompts.",
        "chat": "Talk to a causal-LM run in the terminal (empty line or Ctrl-D to quit).",
    }
    for name, helptext in lm_commands.items():
        sub = commands.add_parser(name, help=helptext, description=helptext)
        sub.add_argument("run", help="A run directory, a checkpoint-N folder, or a model name (Hub id, .gguf, minilm...).")
        if name == "generate":
            sub.add_argument("--prompt", action="append", required=True, help="A prompt (repeatable).")
            sub.add_argument("--raw", action="store_true", help="Continue the prompt text as is (no chat template).")
        sub.add_argument("--max-new-tokens", type=int, default=128, help="Longest reply in tokens.")
        sub.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
        sub.set_defaults(handler=_generate if name == "generate" else _chat)

    for name, helptext in (("eval", "Evaluate a run: labelled data (classification), a text file (perplexity) or "
                                    "standard benchmarks through lm-evaluation-harness (--tasks)."),
                           ("predict", "Predict labels (with probabilities) for texts or a file.")):
        sub = commands.add_parser(name, help=helptext, description=helptext)
        sub.add_argument("run", help="A run directory, or one of its checkpoint-N folders" + (
            " (with --tasks, also a model: Hub id, folder, .gguf, installed name)." if name == "eval" else "."))
        sub.add_argument("--data" if name == "eval" else "--file", dest="data",
                         help="Data file (.jsonl, .json, .csv, .tsv, .parquet, .txt).")
        if name == "eval":
            sub.add_argument("--text-file", help="Causal LMs: a text file scored with sliding-window perplexity.")
            sub.add_argument("--max-length", type=int, default=1024, help="Perplexity window in tokens.")
            sub.add_argument("--stride", type=int, help="Perplexity window stride (default: --max-length).")
            _benchmark_arguments(sub)
        if name == "predict":
            sub.add_argument("--text", action="append", default=[], help="A text to classify (repeatable).")
            sub.add_argument("--image", action="append", default=[],
                             help="Image classifiers: an image file to classify (repeatable); --file then lists "
                             "image paths, one a line.")
            sub.add_argument("--out", help="Write predictions here as JSON lines instead of printing them.")
        sub.add_argument("--text-column", help="Text column (default: the one the run was trained with).")
        sub.add_argument("--text-pair-column", help="Second-sentence column for pair tasks.")
        if name == "eval":
            sub.add_argument("--label-column", help="Label column (default: the run's).")
            sub.add_argument("--metrics", nargs="+", default=list(CLASSIFICATION_METRICS),
                             help="Metrics to compute.")
        sub.add_argument("--batch-size", type=int, help="Texts per forward pass (default: the run's eval batch).")
        sub.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
        sub.set_defaults(handler=_eval if name == "eval" else _predict)


def _eval(args: argparse.Namespace) -> int:
    from llmtune import api

    if args.tasks:
        result = api.benchmark(args.run, args.tasks.split(","), args.limit, args.num_fewshot, args.batch_size or 8,
                               args.data_dir, args.precision, args.out, args.log_samples, args.chat_template,
                               args.max_gen_tokens)
        print(benchmark_table(result), file=sys.stderr)
    elif args.text_file:
        result = api.perplexity(args.run, args.text_file, args.max_length, args.stride, args.precision)
    elif args.data:
        result = api.evaluate(args.run, args.data, args.metrics, args.text_column, args.text_pair_column,
                              args.label_column, args.batch_size, args.precision)
    else:
        raise LlmtuneError("eval needs --data (labelled file, classification runs), --text-file (perplexity) or "
                           "--tasks (benchmarks, causal LMs).")
    print(json.dumps(result, indent=2))
    return 0


def _benchmark_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--tasks", help="Causal LMs: benchmark tasks, comma-separated (arc_easy,arc_challenge,piqa,"
                     "hellaswag,boolq,winogrande,mmlu,gsm8k offline; any lm-eval task with the Hub).")
    sub.add_argument("--limit", type=int, help="Benchmarks: the first N items of each task (default: all).")
    sub.add_argument("--num-fewshot", type=int, help="Benchmarks: few-shot examples (default: each task's own).")
    sub.add_argument("--data-dir", help="Benchmarks: the folder of benchmark files (default: "
                     "$LLMTUNE_BENCHMARK_DATA; without it, the Hub).")
    sub.add_argument("--out", help="Benchmarks: the results file (default: RUN/benchmarks/eval-<time>.json for a run).")
    sub.add_argument("--log-samples", action="store_true",
                     help="Benchmarks: also write every item's prompt, choices, scores and answer beside the results.")
    sub.add_argument("--chat-template", action="store_true",
                     help="Benchmarks: put each question through the model's chat template (few-shot as turns).")
    sub.add_argument("--max-gen-tokens", type=int,
                     help="Benchmarks scored by generation (gsm8k): longest answer in tokens (default: the task's, "
                     "256 for gsm8k). Answers cut short score as written.")


def benchmark_table(result: dict) -> str:
    """Each task's scores with their standard errors, one line per metric."""
    from llmtune.measure.forgetting import stderr_name

    lines = [f"{'task':<28} {'metric':<28} {'score':>8} {'stderr':>8}"]
    for task, row in result["scores"].items():
        for metric, value in row.items():
            if "_stderr" in metric:
                continue
            error = row.get(stderr_name(metric))
            lines.append(f"{task:<28} {metric:<28} {value:8.4f} " + (f"{error:8.4f}" if error is not None else ""))
    files = result.get("files") or []
    return "\n".join(lines + ([f"Results: {files[0]}"] if files else []))


def _predict(args: argparse.Namespace) -> int:
    from llmtune import api

    records = api.predict(args.run, args.text, args.data, args.image, args.text_column, args.text_pair_column,
                          args.batch_size, args.precision)
    return _emit(records, args.out)


def _generate(args: argparse.Namespace) -> int:
    from llmtune import api

    for record in api.generate(args.run, args.prompt, args.max_new_tokens, args.raw, args.precision):
        print(json.dumps(record))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from llmtune import api

    if args.max_new_tokens < 1:
        raise LlmtuneError(f"--max-new-tokens must be at least 1; got {args.max_new_tokens}.")
    lm = api.load_language_model(args.run, "chat", args.precision)
    if not lm.chat:
        raise LlmtuneError(f"'{args.run}' has no chat template; use `llmtune generate --raw` to continue text.")
    messages: list[dict[str, str]] = []
    print("Chatting with", args.run, "(empty line or Ctrl-D to quit)")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        reply = api.generate(lm, [messages], args.max_new_tokens)[0]
        messages.append({"role": "assistant", "content": reply["completion"]})
        print("model>", reply["completion"])
    return 0


def _emit(records: list[dict], out: str | None) -> int:
    """Print prediction records as JSON lines, or write them to --out."""
    lines = [json.dumps(record) for record in records]
    if out:
        from llmtune.run.files import write_text

        write_text(Path(out), "\n".join(lines) + "\n")
        print(f"Wrote {len(lines)} predictions to {out}")
    else:
        print("\n".join(lines))
    return 0
