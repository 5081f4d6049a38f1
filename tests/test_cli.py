"""Command-line behaviour a user meets first: the version, options anywhere after the recipe, fast errors, files
others can read, and a warning when a run cannot have learned anything."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest
from conftest import NO_REPORT, REPO

import llmtune
from llmtune.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"llmtune {llmtune.__version__}"


def test_options_may_come_before_the_overrides(capsys, tmp_path):
    """`train RECIPE --resume key=value` is read as the user meant it (not rejected with the usage text)."""
    code = main(["train", "recipes/quickstart.yaml", "--resume", f"output.dir={tmp_path / 'nothing'}",
                 "training.epochs=1"])
    assert code == 2
    assert "holds no llmtune run" in capsys.readouterr().err  # --resume and both overrides reached the run check
    assert main(["train", "recipes/quickstart.yaml", "--resume", "training.epochs=many"]) == 2
    assert "'training.epochs' is 'many'" in capsys.readouterr().err  # the override after the option is applied


def test_a_recipe_typo_is_reported_fast_and_without_loading_libraries(tmp_path):
    """No torch, transformers or bitsandbytes import for an error that needs no model."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from llmtune.cli import main; code = main(sys.argv[1:]); "
         "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes', 'datasets') if m in sys.modules]; "
         "print('HEAVY', heavy); sys.exit(code)", "train", "recipes/quickstart.yaml", "trainig.epochs=1"],
        cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert result.returncode == 2
    assert 'Did you mean "training"' in result.stderr
    assert "HEAVY []" in result.stdout
    assert seconds < 5, f"a typo took {seconds:.1f} s to report"  # 0.2 s measured; generous for a busy machine


@pytest.mark.slow  # a training and a merge per umask (~3 s each)
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_files_and_merged_folders_get_the_umask_modes(tiny_bert, reviews_files, tmp_path, umask):
    """Files llmtune writes atomically are as readable as files written with open() (0644 under umask 022), not
    private to the user as temporary files are; folders likewise (0755)."""
    previous = os.umask(umask)
    try:
        run_dir = tmp_path / "run"
        assert main(["train", "recipes/quickstart.yaml", f"model.name={tiny_bert}",
                     f"data.train_file={reviews_files['train']}", f"data.eval_file={reviews_files['eval']}",
                     f"data.test_file={reviews_files['test']}", f"output.dir={run_dir}", "training.max_steps=2",
                     "method.type=lora", "output.save=merged", "training.save_every=1"]) == 0
        assert main(["merge", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
        assert main(["predict", str(run_dir), "--text", "great", "--out", str(tmp_path / "p.jsonl")]) == 0
    finally:
        os.umask(previous)
    want_file, want_folder = 0o666 & ~umask, 0o777 & ~umask
    files = [run_dir / name for name in ("model.safetensors", "metrics.json", "run.json", "predictions.jsonl",
                                         "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                                         "checkpoint-2/adapter_model.safetensors", "checkpoint-2/llmtune_checkpoint.json")]
    files += [tmp_path / "merged" / "model.safetensors", tmp_path / "p.jsonl"]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == want_file, (path, oct(path.stat().st_mode))
    for folder in (run_dir / "adapter", tmp_path / "merged", run_dir / "checkpoint-2"):
        assert stat.S_IMODE(folder.stat().st_mode) == want_folder, (folder, oct(folder.stat().st_mode))


def test_a_run_whose_learning_rate_stays_at_zero_is_flagged(tiny_bert, reviews_files, tmp_path, caplog):
    """One step with warm-up: the learning rate is 0 for that step, so nothing is trained - say so."""
    assert main(["train", "recipes/quickstart.yaml", f"model.name={tiny_bert}",
                 f"data.train_file={reviews_files['train']}", "data.eval_file=null", "data.test_file=null",
                 f"output.dir={tmp_path / 'run'}", NO_REPORT, "training.max_steps=1", "training.warmup=0.5",
                 "training.eval_every=no", "training.save_every=no"]) == 0
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "learning rate never rose above 0" in warnings and "No trainable weight changed" in warnings
    train = json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]
    assert train["max_learning_rate"] == 0 and train["weights_changed"] is False
    # A run that does learn records the opposite: tests/test_classification.py::test_full_run_leaves_model_records...
