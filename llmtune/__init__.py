"""llmtune: fine-tune language models from YAML recipes on the Hugging Face stack.

Every command is a function of `llmtune.api`, re-exported here: `llmtune.train(recipe)`, `llmtune.evaluate(run,
data)`, `llmtune.generate(run, prompts)`, ... (see llmtune/api.py)."""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # The API pulls in the config and, when called, torch and transformers; import it only when asked so that
    # `llmtune --help` stays quick.
    import importlib

    api = importlib.import_module("llmtune.api")  # not `from llmtune import api`: that would ask this hook again
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'llmtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    import importlib

    api = importlib.import_module("llmtune.api")
    return sorted([*globals(), *api.__all__])
