"""The commands that make a run from a recipe: train, validate and data preview (and their argument parsers)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

from llmtune.errors import LlmtuneError, TrainingStopped


def add_train_commands(commands: Any) -> None:
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
    build = data_commands.add_parser(
        "constraints",
        help="Make grpo prompts: instructions with sampled, checkable constraints.",
        description="Write a JSONL file of prompts for task grpo: each instruction of SOURCE (a data file with an "
        "instruction, prompt or text column) with 1..N sampled instruction constraints appended (lowercase, word "
        "and sentence limits, keywords, exact start/end, quotes, bullets, sections, JSON) and a 'constraints' "
        "column the built-in constraints reward checks. The same seed gives the same file.",
    )
    build.add_argument("source", help="A .json/.jsonl/.csv/.parquet file of instructions.")
    build.add_argument("--out", required=True, help="The JSONL file to write (refused if it exists).")
    build.add_argument("--per-prompt", type=int, default=2, help="Most constraints per prompt (at least 1 each).")
    build.add_argument("--kinds", default=None, help="Comma-separated constraint kinds to draw from (default: all).")
    build.add_argument("--limit", type=int, default=None, help="Use the first N instructions.")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(handler=_constraints)


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


def _preview(args: argparse.Namespace) -> int:
    from llmtune.config.loader import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from llmtune import api

    colour = not args.no_colour and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    print(api.preview(recipe, args.samples, colour))
    return 0


def _constraints(args: argparse.Namespace) -> int:
    from llmtune import api

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    written = api.constrained_prompts(args.source, args.out, args.per_prompt, args.seed, kinds, args.limit)
    print(f"Wrote {written['rows']} prompts to {written['out']} ({', '.join(f'{k} {n}' for k, n in written['kinds'].items())})")
    return 0
