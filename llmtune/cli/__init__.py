"""`llmtune` command line: train, validate, eval, predict, generate, chat, data preview, merge, push, serve, export.

Errors the user can fix are printed as one paragraph (no traceback) with exit code 2; a training run stopped by
Ctrl-C or SIGTERM saves a resumable checkpoint and exits with 130 or 143.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from llmtune import __version__
from llmtune.cli.observe_commands import add_observe_commands
from llmtune.cli.ship_commands import add_ship_commands
from llmtune.config.vocab import PRECISIONS
from llmtune.errors import LlmtuneError, TrainingStopped

PRECISION_HELP = "Compute precision: auto is the run's own evaluation precision (run.json), fp32 for other models."

EXAMPLES = """examples:
  llmtune train recipes/quickstart.yaml
  llmtune train recipes/sst2_minilm_lora.yaml training.epochs=1 output.dir=runs/try1
  llmtune train recipes/sst2_minilm_lora.yaml --resume
  llmtune train recipes/quickstart.yaml --accelerate cpu_ddp          # 2 processes on CPU
  accelerate launch --config_file accelerate_configs/fsdp.yaml -m llmtune train recipes/smollm2_alpaca_full.yaml
  llmtune eval runs/try1 --data dev.tsv --text-column sentence
  llmtune predict runs/try1 --text "a gripping, beautiful film"
  llmtune validate recipes/sst2_minilm_full.yaml data.max_train_samples=512
  llmtune train recipes/smollm2_alpaca_lora.yaml
  llmtune data preview recipes/smollm2_alpaca_lora.yaml -n 2
  llmtune generate runs/my-sft-run --prompt "Name three primary colours."
  llmtune eval smollm2-135m-instruct --text-file ../shared/data/wikitext-2/valid.txt --max-length 1024
  llmtune merge runs/my-qlora-run --out models/my-merged
  llmtune push runs/my-qlora-run --repo-id me/smollm2-alpaca-qlora --private
  LLMTUNE_API_KEY=secret llmtune serve runs/my-sft-run --port 8000     # OpenAI-compatible HTTP
  llmtune export runs/my-sft-run --format ollama --quant q8_0           # GGUF + Modelfile
  llmtune export runs/try1 --format onnx && llmtune predict runs/try1/export/try1-onnx --text "fine"
"""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(_attach_dashed_values(sys.argv[1:] if argv is None else argv))
    # Overrides may come after options (`train RECIPE --resume key=value`): argparse leaves those over.
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.verbose)
    try:
        return args.handler(args)
    except LlmtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # TrainingStopped (a checkpoint was saved) or a second Ctrl-C
        print(f"\n{exc or 'Interrupted.'}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)


# Options whose value may start with '-' (a negative size is refused with its own message, not argparse's).
DASHED_VALUE_OPTIONS = ("--device-memory",)


def _attach_dashed_values(argv: list[str]) -> list[str]:
    """`--device-memory -5GB` -> `--device-memory=-5GB`: argparse would read '-5GB' as an unknown option."""
    out: list[str] = []
    for item in argv:
        if out and out[-1] in DASHED_VALUE_OPTIONS and item.startswith("-"):
            out[-1] = f"{out[-1]}={item}"
        else:
            out.append(item)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmtune",
        description="Fine-tune language models from YAML recipes.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Show the libraries' info logging too.")
    parser.add_argument("--version", action="version", version=f"llmtune {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="Train a recipe.",
        description="Train a recipe: load, tokenize, train, evaluate, save. Overrides are section.key=value.",
        epilog="example: llmtune train recipes/quickstart.yaml training.epochs=1 output.dir=runs/q1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("recipe", help="Path of a YAML recipe (see recipes/).")
    train.add_argument("overrides", nargs="*", help="Recipe overrides such as training.learning_rate=1e-4.")
    train.add_argument("--resume", action="store_true",
                       help="Continue the run in output.dir from its newest complete checkpoint.")
    train.add_argument("--force", action="store_true",
                       help="With --resume: accept settings that differ from the run's own (recorded in run.json).")
    train.add_argument("--accelerate", metavar="CONFIG",
                       help="Re-launch under `accelerate launch` with a config from accelerate_configs/ by short name "
                       "(single, cpu_ddp, multi_gpu, fsdp, fsdp_qlora, deepspeed_zero2, deepspeed_zero3, ...) or a path.")
    train.add_argument("--num-processes", type=int, help="With --accelerate: processes to start (default: the config's).")
    train.set_defaults(handler=_train)

    validate = commands.add_parser(
        "validate",
        help="Check a recipe without training.",
        description="Check a recipe's keys, types and rules, that its data files and columns exist and that its "
        "model resolves - without training. --explain lists every recipe key with its meaning.",
    )
    validate.add_argument("recipe", nargs="?", help="Path of a YAML recipe.")
    validate.add_argument("overrides", nargs="*", help="Recipe overrides such as data.max_length=64.")
    validate.add_argument("--explain", action="store_true", help="Print every recipe key, its default and help.")
    validate.set_defaults(handler=_validate)

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

    data = commands.add_parser("data", help="Inspect a recipe's processed data.", description="Inspect a recipe's data.")
    data_commands = data.add_subparsers(title="data commands", required=True, metavar="COMMAND")
    show = data_commands.add_parser(
        "preview",
        help="Show processed samples with trained / masked tokens, and token statistics.",
        description="Show N processed training samples with every token marked trained-on or masked (colour in a "
        "terminal, [[trained]] markers otherwise), plus samples, tokens, truncation rate and packing efficiency.",
    )
    show.add_argument("recipe", help="Path of a YAML recipe (task sft or pretrain).")
    show.add_argument("overrides", nargs="*", help="Recipe overrides.")
    show.add_argument("-n", "--samples", type=int, default=3, help="How many samples to show.")
    show.add_argument("--no-colour", action="store_true", help="Plain [[markers]] even in a terminal.")
    show.set_defaults(handler=_preview)

    for name, helptext in (("eval", "Evaluate a run on labelled data (classification) or a text file (perplexity)."),
                           ("predict", "Predict labels (with probabilities) for texts or a file.")):
        sub = commands.add_parser(name, help=helptext, description=helptext)
        sub.add_argument("run", help="A run directory, or one of its checkpoint-N folders.")
        sub.add_argument("--data" if name == "eval" else "--file", dest="data",
                         help="Data file (.jsonl, .json, .csv, .tsv, .parquet, .txt).")
        if name == "eval":
            sub.add_argument("--text-file", help="Causal LMs: a text file scored with sliding-window perplexity.")
            sub.add_argument("--max-length", type=int, default=1024, help="Perplexity window in tokens.")
            sub.add_argument("--stride", type=int, help="Perplexity window stride (default: --max-length).")
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
            sub.add_argument("--metrics", nargs="+", default=["accuracy", "f1", "precision", "recall", "roc_auc"],
                             help="Metrics to compute.")
        sub.add_argument("--batch-size", type=int, help="Texts per forward pass (default: the run's eval batch).")
        sub.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
        sub.set_defaults(handler=_eval if name == "eval" else _predict)

    add_observe_commands(commands)
    add_ship_commands(commands)
    return parser


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


def _setup_logging(verbose: bool) -> None:
    from llmtune.run.distributed import is_main_process

    # Under a multi-process launch only the main process reports progress; the others speak up on problems.
    level = logging.INFO if is_main_process() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:  # the libraries' deprecation notes speak to llmtune's developers, not to a CLI user
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Read by transformers when (and only if) a command imports it: a recipe typo never pays for that import.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "warning")
    if verbose:  # the libraries' own bars and warnings too (llmtune/observe/console.py); inherited by launched ranks
        os.environ["LLMTUNE_VERBOSE"] = "1"
    else:  # the gguf writer logs every file it opens at INFO; llmtune says what it writes itself
        logging.getLogger("gguf").setLevel(logging.WARNING)



def _train(args: argparse.Namespace) -> int:
    from llmtune.config.loader import load_recipe

    if args.accelerate:
        from llmtune.api import launch

        return launch(args.recipe, args.overrides, args.accelerate, args.num_processes, args.resume, args.force)
    recipe = load_recipe(args.recipe, args.overrides)  # a bad recipe fails here, before anything heavy loads
    from llmtune.api import train
    from llmtune.run.distributed import shut_down, world_size

    # Leave the group only when every rank is done: after a failure the others may still be in a collective.
    try:
        train(recipe, resume=args.resume, overrides=args.overrides, force=args.force)
    except TrainingStopped:  # all ranks agreed to stop and saved the checkpoint
        shut_down()
        raise
    except BaseException:
        if world_size() == 1:  # no other rank to wait for
            with contextlib.suppress(Exception):  # the run's own error is the one to report
                shut_down()
        raise
    shut_down()
    return 0


def _validate(args: argparse.Namespace) -> int:
    from llmtune.config.loader import load_recipe

    if args.explain:
        from llmtune.config.explain import explain

        print(explain())
        return 0
    if not args.recipe:
        raise LlmtuneError("validate needs a recipe path (or --explain).")
    recipe = load_recipe(args.recipe, args.overrides)
    from llmtune.api import validate

    print(json.dumps(validate(recipe), indent=2))
    print("recipe OK")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from llmtune import api

    if args.text_file:
        result = api.perplexity(args.run, args.text_file, args.max_length, args.stride, args.precision)
    elif args.data:
        result = api.evaluate(args.run, args.data, args.metrics, args.text_column, args.text_pair_column,
                              args.label_column, args.batch_size, args.precision)
    else:
        raise LlmtuneError("eval needs --data (labelled file, classification runs) or --text-file (perplexity).")
    print(json.dumps(result, indent=2))
    return 0


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


def _preview(args: argparse.Namespace) -> int:
    from llmtune.config.loader import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from llmtune import api

    colour = not args.no_colour and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    print(api.preview(recipe, args.samples, colour))
    return 0
