"""`llmtune ui`: the browser UI (llmtune/ui/) over the runs and recipes folders."""

from __future__ import annotations

import argparse
import os
from typing import Any

from llmtune.cli.ship_commands import API_KEY_ENV


def add_ui_command(commands: Any) -> None:
    ui = commands.add_parser(
        "ui", help="Start, watch, compare, try and ship runs in a browser.",
        description="A web UI over the runs folder and the recipes folder: every run's state (right after a reload "
        "or a restart of the UI), a new run from a recipe with the form checked as `llmtune validate` checks it, "
        "live curves, stop and resume, compare, chat or classify, export / merge / push. Runs started here are the "
        "same `llmtune train` command, detached: they outlive the UI.")
    ui.add_argument("--runs", default="runs", help="Folder of runs to show; new runs go here (default: runs).")
    ui.add_argument("--recipes", default="recipes", help="Folder of recipes to start from (default: recipes).")
    ui.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: this machine only).")
    ui.add_argument("--port", type=int, default=7860, help="Port to listen on (default: 7860).")
    ui.add_argument("--api-key", help=f"Require this key (default: ${API_KEY_ENV} if set); needed for a --host other "
                    "than this machine. Prefer the environment variable: command lines are visible to other users.")
    ui.add_argument("--insecure", action="store_true", help="Allow another --host without an API key.")
    ui.set_defaults(handler=_ui)


def _ui(args: argparse.Namespace) -> int:
    from llmtune.errors import LlmtuneError
    from llmtune.ui import UiSettings, run_ui

    for flag, folder in (("--runs", args.runs), ("--recipes", args.recipes)):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise LlmtuneError(f"{flag} is '{folder}', which is a file; give a folder.")
    if not os.path.isdir(args.recipes):
        raise LlmtuneError(f"--recipes is '{args.recipes}', which does not exist; give the folder holding your .yaml "
                           "recipes (llmtune's own are in its repository's recipes/).")
    os.makedirs(args.runs, exist_ok=True)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    run_ui(UiSettings(args.runs, args.recipes, api_key), args.host, args.port, args.insecure)
    return 0
