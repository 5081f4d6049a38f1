"""Publish a run to the Hugging Face Hub (or a private hub at HF_ENDPOINT): adapter or merged model, tokenizer,
the resolved recipe and a generated model card, in one commit.

The run directory is only read. Files are staged in a temporary folder and uploaded as a single commit, so a
failed push leaves nothing half-written on the Hub and the same command can simply be run again. The token
comes from `hf auth login` or HF_TOKEN and is passed to the client only - never logged or written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from llmtune.config.rules import check_repo_id
from llmtune.errors import LlmtuneError
from llmtune.hub.model_card import render
from llmtune.inference.trained import name_base_in_adapter_config
from llmtune.models.sources import hub_base_model
from llmtune.run.files import read_json
from llmtune.run.run_dir import METRICS_FILE, RUN_RECORD

logger = logging.getLogger(__name__)

# Run files that are not part of the published model: records, predictions, pickled trainer arguments.
NOT_PUBLISHED = {RUN_RECORD, METRICS_FILE, "predictions.jsonl", "generations.jsonl", "training_args.bin"}


def require_token() -> str:
    token = get_token()
    if not token:
        raise LlmtuneError(
            "Pushing to the Hub needs a Hugging Face token with write access, and none was found. Log in with "
            "`hf auth login`, or set the HF_TOKEN environment variable. Nothing was uploaded."
        )
    return token


def push(run: str | Path, repo_id: str, private: bool = False, merged: bool = False) -> str:
    """Upload the run's model (merging its adapter first when `merged`) with a model card; return the repo URL."""
    run_dir = Path(run)
    check_repo_id(repo_id, "--repo-id")
    if not (run_dir / RUN_RECORD).is_file():
        raise LlmtuneError(f"'{run_dir}' is not an llmtune run directory (it has no {RUN_RECORD}).")
    token = require_token()
    record = read_json(run_dir / RUN_RECORD)
    metrics = read_json(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).is_file() else {}
    is_adapter = (run_dir / "adapter_config.json").is_file()

    with tempfile.TemporaryDirectory(prefix="llmtune-push-") as tmp:
        staging = Path(tmp) / "repo"
        if merged and is_adapter:
            from llmtune.inference.merge import merge_adapter

            merge_adapter(run_dir, staging)
            kind = "merged"
        else:
            kind = "adapter" if is_adapter else ("merged" if (run_dir / "adapter").is_dir() else "full")
            staging.mkdir()
            for item in run_dir.iterdir():
                if item.is_file() and item.name not in NOT_PUBLISHED and not item.name.startswith("."):
                    shutil.copy2(item, staging / item.name)
        _point_adapter_at_hub_base(staging, record["recipe"])
        (staging / "llmtune_recipe.json").write_text(json.dumps(record["recipe"], indent=2) + "\n")
        (staging / "README.md").write_text(render(record, metrics, repo_id, kind))
        return _upload(staging, repo_id, private, token, kind, run_dir)


def _point_adapter_at_hub_base(staging: Path, recipe: dict) -> None:
    """Adapters may record the local folder their base was loaded from; the published one names the Hub id."""
    if not (staging / "adapter_config.json").is_file():
        return
    base = hub_base_model(recipe)
    if base is None:
        logger.warning("The base model '%s' has no Hub id; loaders of this adapter must supply the base themselves.",
                       recipe["model"]["name"])
        return
    name_base_in_adapter_config(staging, base, recipe["model"].get("revision"))


def _upload(staging: Path, repo_id: str, private: bool, token: str, kind: str, run_dir: Path) -> str:
    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token)
    where = f"{endpoint or 'the Hugging Face Hub'}"
    untouched = f"The run in '{run_dir}' is untouched; run the same command again to retry."
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        logger.info("Uploading %s (%d files) to %s", kind, len(list(staging.iterdir())), url)
        api.upload_folder(folder_path=str(staging), repo_id=repo_id,
                          commit_message=f"Upload {kind} trained with llmtune")
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            why = (f"{where} refused the token (HTTP {status}): it needs write access to '{repo_id}' "
                   "(`hf auth login` with a write token, or HF_TOKEN).")
        else:
            why = f"{where} answered HTTP {status} ({str(exc).splitlines()[0]})."
        raise LlmtuneError(f"Pushing to '{repo_id}' failed: {why} {untouched}") from None
    except Exception as exc:  # network failures surface as the HTTP client's own error types
        raise LlmtuneError(
            f"Pushing to '{repo_id}' failed: could not talk to {where} ({type(exc).__name__}: {exc}). {untouched}"
        ) from None
    logger.info("Pushed to %s", url)
    return str(url)
