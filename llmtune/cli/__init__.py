"""`llmtune` command line: train, validate, data preview (train_commands.py); eval, predict, generate, chat
(use_commands.py); report, plan, sweep (observe_commands.py); merge, push, serve, export (ship_commands.py). Each
handler parses its arguments, calls one function of llmtune.api and prints the result.

Errors the user can fix are printed as one paragraph (no traceback) with exit code 2; a training run stopped by
Ctrl-C or SIGTERM saves a resumable checkpoint and exits with 130 or 143.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from llmtune import __version__
from llmtune.cli.observe_commands import add_observe_commands
from llmtune.cli.ship_commands import add_ship_commands
from llmtune.cli.train_commands import add_train_commands
from llmtune.cli.ui_command import add_ui_command
from llmtune.cli.use_commands import add_use_commands
from llmtune.errors import LlmtuneError

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
    except BrokenPipeError:  # `llmtune validate --explain | head`: the reader stopped reading, nothing failed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush would raise again
        return 0
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
    add_train_commands(commands)
    add_use_commands(commands)
    add_observe_commands(commands)
    add_ship_commands(commands)
    add_ui_command(commands)
    return parser


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
