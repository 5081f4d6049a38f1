"""What `llmtune ui` was started with: the folders it may read and write, and the key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class UiSettings:
    """The runs folder (shown; new runs go there), the recipes folder (new runs start from its files), the API key
    (None: no key, only for this machine). Nothing outside the two folders is read or written from the browser."""

    runs: Path
    recipes: Path
    api_key: str | None = None

    def __post_init__(self) -> None:
        self.runs, self.recipes = Path(self.runs).resolve(), Path(self.recipes).resolve()
