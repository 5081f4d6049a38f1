"""Shared test set-up: offline Hub, a private HF cache, real data paths and a tiny BERT built from a config."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Set before transformers/datasets are imported anywhere, so no test can reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="llmtune-test-hf-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "sst2" / "train.tsv").exists():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (the project's shared data folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from llmtune.models.sources import resolve_model

    return resolve_model("minilm").path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_path) -> str:
    """A 2-layer, 32-wide BERT with random weights and MiniLM's tokenizer: trains in a second."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture()
def reviews_files(tmp_path) -> dict[str, Path]:
    """Small labelled files written per test (string labels), derived from the quickstart data."""
    source = REPO / "recipes" / "data" / "reviews"
    files = {}
    for name, rows in (("train", 64), ("eval", 32), ("test", 8)):
        lines = (source / f"{name}.jsonl").read_text().splitlines()[:rows]
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("\n".join(lines) + "\n")
    return files


def run_cli(*args: str, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m llmtune ...` in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "llmtune", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )
