"""llmtune installed from a wheel (not the editable checkout) works from another folder, multi-process launch included:
everything it needs at run time - accelerate configs, metric modules - travels inside the package."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_wheel_installed_in_a_fresh_venv_trains_with_cpu_ddp_from_another_folder(tiny_bert, reviews_files, tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("llmtune-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The libraries come from this test's environment (a .pth line adds its site-packages without running its .pth
    # files, so the editable checkout stays out); llmtune itself comes only from the wheel.
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                                str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import llmtune; print(llmtune.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where

    run_dir = tmp_path / "run"
    result = subprocess.run(
        [str(venv / "bin" / "llmtune"), "train", str(REPO / "recipes" / "quickstart.yaml"), "--accelerate", "cpu_ddp",
         f"model.name={tiny_bert}", f"data.train_file={reviews_files['train']}",
         f"data.eval_file={reviews_files['eval']}", "data.test_file=null", "training.max_steps=4",
         f"output.dir={run_dir}"], cwd=elsewhere, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert record["world_size"] == 2 and metrics["train"]["ranks_in_sync"] is True
    assert "accuracy" in metrics["after"]  # the metric modules shipped inside the wheel load
