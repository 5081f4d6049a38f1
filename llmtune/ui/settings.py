"""What `llmtune ui` was started with: the folders it may read and write, and the key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class UiSettings:
    """The runs folder (shown; new runs go there), the recipes folder (new runs start from its files), the API key
    (None: no key, only for this machine). The browser names runs and recipes, never paths: no file outside the
    two folders is read or written by a name it sends. A recipe's own keys (data files, model folders) are
    read as `llmtune train` reads them - the form is the recipe - so whoever may use the UI may train on any file
    this account can read, as on the command line."""

    runs: Path
    recipes: Path
    api_key: str | None = None
    local_only: bool = True  # listening on this machine only: answer only requests addressed to its names

    def __post_init__(self) -> None:
        self.runs, self.recipes = Path(self.runs).resolve(), Path(self.recipes).resolve()
