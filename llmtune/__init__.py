"""llmtune: fine-tune language models from YAML recipes on the Hugging Face stack."""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # The API pulls in torch and transformers; import it only when asked so `llmtune --help` stays quick.
    if name in ("load_recipe", "build_trainer", "train", "validate"):
        from llmtune import api

        return getattr(api, name)
    raise AttributeError(f"module 'llmtune' has no attribute {name!r}")
