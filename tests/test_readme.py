"""The README's own commands run as written: every `llmtune ...` line in a ```bash block, in order, at a small size
(a few steps, a few dozen rows) - except lines whose comment says what they need ("# needs: GPUs"). Synopses with
placeholders live in ```text blocks and are not run."""

from __future__ import annotations

import concurrent.futures
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO, SHARED_DATA, require_shared

pytestmark = pytest.mark.slow

# Two optimizer steps of 2 rows (the recipes' accumulation of 4 would make each step 16 rows), no evaluation
# before training: the commands are checked to run as written, other tests check what training achieves.
SMALL = ["training.max_steps=2", "training.batch_size=2", "training.gradient_accumulation=1",
         "eval.before_training=false", "data.max_train_samples=24", "data.max_eval_samples=8",
         "lm.generation_prompts=[]", "data.max_length=128", "pref.max_prompt_length=64"]


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


def chains(commands: list[str]) -> list[list[str]]:
    """The commands grouped so that commands sharing a `runs/...` or `models/...` folder stay in one chain, in README
    order (a train and the eval of its run); chains share nothing and can run side by side."""
    groups: list[tuple[set[str], list[str]]] = []
    for command in commands:
        folders = set(re.findall(r"(?:^|[ =])((?:runs|models)/[^ /]+)", command))
        joined = [g for g in groups if g[0] & folders]
        merged = (folders.union(*(g[0] for g in joined)), [c for g in joined for c in g[1]] + [command])
        groups = [g for g in groups if not any(g is j for j in joined)] + [merged]
    order = {command: i for i, command in enumerate(commands)}
    return [sorted(group, key=order.__getitem__) for _, group in sorted(groups, key=lambda g: order[g[1][0]])]


def test_readme_commands_run_as_written(tmp_path):
    require_shared(SHARED_DATA / "alpaca")
    small_text = tmp_path / "valid.txt"
    small_text.write_text((SHARED_DATA / "wikitext-2" / "valid.txt").read_text()[:4000])

    def run_chain(chain: list[str]) -> list[str]:
        failures = []
        for line in chain:
            argv = []
            for arg in shlex.split(line, comments=True)[1:]:
                arg = re.sub(r"(^|=)(runs|models)/", lambda m: f"{m.group(1)}{tmp_path}/{m.group(2)}/", arg)
                argv.append(str(small_text) if arg.endswith("wikitext-2/valid.txt") else arg)
            if argv[0] == "train":
                argv += SMALL
            # two chains side by side on two cores: one compute thread each instead of two fighting for both
            result = subprocess.run([sys.executable, "-m", "llmtune", *argv], cwd=REPO, capture_output=True,
                                    text=True, input="Hello!\n\n" if argv[0] == "chat" else None, timeout=900,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            if result.returncode != 0:
                failures.append(f"README command failed: {line}\n{result.stderr[-3000:]}")
                break  # the rest of this chain needs what this command makes
        return failures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        failures = [f for found in pool.map(run_chain, chains(readme_commands())) for f in found]
    assert not failures, "\n\n".join(failures)


def test_commands_that_share_a_run_folder_run_in_one_chain_in_order():
    commands = ["llmtune train a.yaml output.dir=runs/x", "llmtune train b.yaml output.dir=runs/y",
                "llmtune eval runs/x --data d", "llmtune merge runs/y --out models/m", "llmtune push models/m"]
    assert chains(commands) == [[commands[0], commands[2]], [commands[1], commands[3], commands[4]]]


def test_readme_python_session_runs_top_to_bottom(tmp_path):
    """The "From Python" block, as written, at a small size (two steps, a few rows), twice in a row in one folder:
    the second run must be refused with llmtune's own message (the first run's folder holds a run), not lost."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"### From Python.*?```python\n(.*?)```", text, flags=re.S).group(1)
    assert "llmtune.train(" in block and "llmtune.predict(" in block
    small = ["training.max_steps=2", "training.batch_size=8", "data.max_train_samples=16", "data.max_eval_samples=8",
             "output.report=false"]
    code = block.replace('["output.dir=', f'[*{small!r}, "output.dir=')
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    first = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                           env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "runs" / "notebook" / "metrics.json").is_file()
    again = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                           env=env)
    assert again.returncode != 0 and "LlmtuneError" in again.stderr and "already holds" in again.stderr
