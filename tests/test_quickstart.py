"""The README's first command: the quickstart recipe, offline, shows that fine-tuning worked."""

from __future__ import annotations

import json
import logging
import re

import pytest
from conftest import REPO, run_main

pytestmark = pytest.mark.slow  # trains or loads a real checkpoint on real data


def test_quickstart_recipe_improves_accuracy_on_held_out_reviews(tmp_path, caplog):
    caplog.set_level(logging.INFO)  # in this process the log goes to pytest's handler
    result = run_main("train", "recipes/quickstart.yaml", f"output.dir={tmp_path / 'quick'}", cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "quick" / "metrics.json").read_text())
    # the before -> after table the user sees at the end shows the same numbers as metrics.json
    printed = result.stdout + result.stderr + caplog.text
    row = re.search(r"^accuracy +([0-9.]+) +([0-9.]+) +[+-][0-9.]+$", printed, re.MULTILINE)
    assert row, printed[-3000:]
    assert [float(row[1]), float(row[2])] == pytest.approx(
        [metrics["before"]["accuracy"], metrics["after"]["accuracy"]], abs=1e-4)
    assert metrics["after"]["accuracy"] >= 0.9 > metrics["before"]["accuracy"] + 0.2
    assert len((tmp_path / "quick" / "predictions.jsonl").read_text().splitlines()) == 20
