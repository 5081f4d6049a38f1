"""The README's own commands run as written: every `llmtune ...` line in a ```bash block, in order, at a small size
(a few steps, a few dozen rows) - except lines whose comment says what they need ("# needs: GPUs"). Synopses with
placeholders live in ```text blocks and are not run."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.slow

SMALL = ["training.max_steps=2", "data.max_train_samples=24", "data.max_eval_samples=8", "lm.generation_prompts=[]",
         "data.max_length=128", "pref.max_prompt_length=64"]


def readme_commands() -> list[str]:
    """`llmtune` command lines of the README's bash blocks (continuations joined), without the `needs:` ones."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("llmtune ") and "# needs:" not in line:
                commands.append(line)
    return commands


def test_the_readme_has_runnable_commands():
    commands = readme_commands()
    assert len(commands) >= 10, commands
    assert any("--resume" in c for c in commands) and any("--accelerate cpu_ddp" in c for c in commands)


def test_readme_commands_run_as_written(tmp_path):
    if not (SHARED_DATA / "alpaca").exists():
        pytest.skip(f"the shared datasets are not at {SHARED_DATA}")
    small_text = tmp_path / "valid.txt"
    small_text.write_text((SHARED_DATA / "wikitext-2" / "valid.txt").read_text()[:4000])
    for line in readme_commands():
        argv = []
        for arg in shlex.split(line, comments=True)[1:]:
            arg = re.sub(r"(^|=)(runs|models)/", lambda m: f"{m.group(1)}{tmp_path}/{m.group(2)}/", arg)
            argv.append(str(small_text) if arg.endswith("wikitext-2/valid.txt") else arg)
        if argv[0] == "train":
            argv += SMALL
        result = subprocess.run([sys.executable, "-m", "llmtune", *argv], cwd=REPO, capture_output=True, text=True,
                                input="Hello!\n\n" if argv[0] == "chat" else None, timeout=900)
        assert result.returncode == 0, f"README command failed: {line}\n{result.stderr[-3000:]}"
