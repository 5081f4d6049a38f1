"""Shared test set-up: offline Hub, a private HF cache, real data paths and a tiny BERT built from a config."""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Set before transformers/datasets are imported anywhere, so no test can reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest caches its assertion-rewritten test modules only where bytecode may be written; an environment with
# PYTHONDONTWRITEBYTECODE=1 would otherwise rewrite all of them in every run (~4 s of each fast-tier worker's start).
sys.dont_write_bytecode = False
# The test command installs with `pip --no-compile` (about 90 s less install; the modules a test uses are compiled on
# first import instead): the processes the tests start must then cache what they compile, or each would compile
# torch and transformers again (+9 s each).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
# Under pytest-xdist (`-n N`), each worker - and every process a test starts, which inherits this - computes with its
# share of the cores: N workers each running a core count of OpenMP threads would oversubscribe them (up to 10x
# slower on 2 cores). Set before torch is imported anywhere.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

# A private HF cache and llmtune cache per session, deleted when it ends: a full run derives several GB (datasets
# caches, merged adapters) that must not pile up on the machine. GGUF conversions are a pure function of the
# installed file, so they stay shared in the user's cache (the slow tests would otherwise redo them every session).
_SESSION_FOLDERS: list[str] = []
if "HF_HOME" not in os.environ:
    _SESSION_FOLDERS.append(os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="llmtune-test-hf-")))
if "LLMTUNE_CACHE" not in os.environ:
    _user_gguf = Path.home() / ".cache" / "llmtune" / "gguf"
    _user_gguf.mkdir(parents=True, exist_ok=True)
    _SESSION_FOLDERS.append(os.environ.setdefault("LLMTUNE_CACHE", tempfile.mkdtemp(prefix="llmtune-test-cache-")))
    (Path(os.environ["LLMTUNE_CACHE"]) / "gguf").symlink_to(_user_gguf, target_is_directory=True)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# Runs whose tests do not look at the report skip drawing it (about 0.5 s a run); tests/test_observe.py checks it.
NO_REPORT = "output.report=false"


def pytest_addoption(parser):
    parser.addoption(
        "--cpu-bf16", choices=("auto", "on", "off"), default="auto",
        help="on: run as on a CPU with native bf16 (training.precision auto -> bf16, bitsandbytes' avx512_bf16 "
        "probe true), whatever this CPU has; off: as on one without; auto: this CPU as it is.",
    )


def pytest_unconfigure(config):
    for folder in _SESSION_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


# The files with the longest slow tests, longest first (measured on a CI run). `--dist loadfile` keeps each file on
# one worker (its module fixtures are made once) and hands files out in collection order, so these start first and
# the short ones fill in around them, instead of one long file starting last and running alone at the end.
# (Not `--dist loadgroup`: with pytest >= 9.2 it silently spreads a group over both workers, tests/test_readme.py.)
LONGEST_FIRST = ("test_readme.py", "test_faults.py", "test_distributed.py", "test_export.py", "test_real_sst2.py",
                 "test_real_smollm2_sft.py", "test_grpo.py", "test_real_grpo.py", "test_real_benchmarks.py",
                 "test_observe.py", "test_merge_push.py", "test_preference.py", "test_real_decoder.py",
                 "test_real_qlora.py", "test_serve.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


def pytest_configure(config):
    mode = config.getoption("--cpu-bf16")
    if mode == "auto":
        return
    os.environ["LLMTUNE_CPU_BF16"] = "1" if mode == "on" else "0"
    # bitsandbytes asks its native library once per 4-bit layer; make it answer as asked, here and in every
    # subprocess a test starts (tests/bnb_probe/sitecustomize.py, on PYTHONPATH).
    os.environ["LLMTUNE_TEST_BNB_AVX512BF16"] = "1" if mode == "on" else "0"
    probe = Path(__file__).resolve().parent / "bnb_probe"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(probe), os.environ.get("PYTHONPATH")]))
    runpy.run_path(str(probe / "sitecustomize.py"))


@pytest.fixture()
def bnb_avx512bf16(monkeypatch):
    """bitsandbytes as on a CPU with avx512_bf16 (where its 4-bit layers repack weights for inference)."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)


def require_shared(path: Path) -> Path:
    """A file or folder of the shared real data. Missing in CI it fails the test (a green run must mean the real
    checkpoints and data were used); on a developer's machine without ../shared it skips, saying where it looked."""
    if not path.exists():
        message = f"real data not found at {path} (the project's shared data folder, ../shared/data)"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must run the tests on real data", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    require_shared(SHARED_DATA / "sst2" / "train.tsv")
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
    return write_reviews(tmp_path)


def write_reviews(folder: Path) -> dict[str, Path]:
    source = REPO / "recipes" / "data" / "reviews"
    files = {}
    for name, rows in (("train", 64), ("eval", 32), ("test", 8)):
        lines = (source / f"{name}.jsonl").read_text().splitlines()[:rows]
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("\n".join(lines) + "\n")
    return files


def run_main(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`llmtune ARGS` through the CLI's own entry point in this process - the code a shell runs, without ten
    seconds of library imports per call - with what it printed. Log lines are not in it (the logging handler keeps
    the stream it was made with): tests that read the log use run_cli."""
    from llmtune.cli import main

    out, err, previous = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(["llmtune", *args], code, out.getvalue(), err.getvalue())


def run_cli(*args: str, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m llmtune ...` in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "llmtune", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """SmolLM2-135M-Instruct, converted once from the installed GGUF file (cached under ~/.cache/llmtune)."""
    from llmtune.models.sources import resolve_model

    return resolve_model("smollm2-135m-instruct").path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_path) -> str:
    """A 2-layer, 32-wide Llama with random weights and SmolLM2's tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture()
def alpaca_files(tmp_path) -> dict[str, Path]:
    """Alpaca-format train (48) and eval (16) files cut from the shared Alpaca subset (short examples)."""
    import json

    source = require_shared(SHARED_DATA / "alpaca" / "alpaca_5000.json")
    rows = [r for r in json.loads(source.read_text()) if len(r["output"]) < 300 and len(r["instruction"]) < 200]
    files = {}
    for name, part in (("train", rows[:48]), ("eval", rows[48:64])):
        files[name] = tmp_path / f"alpaca_{name}.json"
        files[name].write_text(json.dumps(part))
    return files


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The installed SmolLM2-135M-Instruct .gguf file itself (not the converted copy)."""
    from llmtune.models.sources import _installed_path

    return _installed_path("smollm2-135m-instruct")


def check_report(run_dir: Path, plots: set[str]) -> str:
    """The run's report exists with these plots, and its loss curve is exactly the logged training loss."""
    import json

    from llmtune.observe.report import curve_figure, curves

    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    assert plots <= {p.name for p in (run_dir / "plots").glob("*.png")}
    figure = curve_figure({"run": curves(history)}, ["loss"], "Loss", "loss")
    logged = [(h["step"], h["loss"]) for h in history if "loss" in h]
    assert [tuple(p) for p in figure.axes[0].lines[0].get_xydata()] == logged and logged
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= len(plots)
    return page
