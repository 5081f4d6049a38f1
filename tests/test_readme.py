"""The README's own commands run as written: every `llmtune ...` line in a ```bash block, in order, at a small size
(a few steps, a few dozen rows) - except lines whose comment says what they need ("# needs: GPUs"). Synopses with
placeholders live in ```text blocks and are not run.

Each command shape (the command and its options: `train`, `train --resume`, `export --format onnx`, `eval
--text-file`, ...) runs for real once, with the trainings the real commands need; a later `train` of a shape
already run is checked with `llmtune validate` (recipe, model, data and tokenization, no training), and every line
is parsed by llmtune's own argument parser. What the trainings achieve is the other tests' business."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA, require_shared

pytestmark = pytest.mark.slow

# Two optimizer steps of 2 rows (the recipes' accumulation of 4 would make each step 16 rows), no evaluation
# before training: the commands are checked to run as written, other tests check what training achieves.
SMALL_DATA = ["data.max_train_samples=24", "data.max_eval_samples=8"]
SMALL = ["training.max_steps=2", "training.batch_size=2", "training.gradient_accumulation=1",
         "eval.before_training=false", *SMALL_DATA, "lm.generation_prompts=[]", "data.max_length=128",
         "pref.max_prompt_length=64"]


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


def shape(line: str) -> tuple:
    """What a command line exercises: the command, its options, and the export format (each format is its own
    writer)."""
    argv = shlex.split(line, comments=True)[1:]
    command = argv[:2] if argv[0] == "data" else argv[:1]
    options = sorted({arg.split("=")[0] for arg in argv if arg.startswith("--")})
    fmt = argv[argv.index("--format") + 1] if "--format" in argv else None
    return (*command, *options, fmt)


def folders(line: str) -> set[str]:
    return set(re.findall(r"(?:^|[ =])((?:runs|models)/[^ /]+)", line))


def real_commands(commands: list[str]) -> set[str]:
    """The lines that run for real: the first of each shape, and every `train` whose run a real line reads."""
    real, seen = set(), set()
    for line in commands:
        if shape(line) not in seen:
            seen.add(shape(line))
            real.add(line)
    for line in reversed(commands):  # a real line needs the trainings that make the folders it reads
        needed = set().union(*(folders(r) for r in real if commands.index(r) > commands.index(line)))
        made = set(re.findall(r"output\.dir=((?:runs|models)/[^ /]+)", line))
        if line.split()[1] == "train" and made & needed:
            real.add(line)
    return real


def readme_argv(line: str, tmp_path: Path, small_text: Path) -> list[str]:
    """The line's arguments with its runs/ and models/ folders under tmp_path and WikiText-2 cut short."""
    argv = []
    for arg in shlex.split(line, comments=True)[1:]:
        arg = re.sub(r"(^|=)(runs|models)/", lambda m: f"{m.group(1)}{tmp_path}/{m.group(2)}/", arg)
        argv.append(str(small_text) if arg.endswith("wikitext-2/valid.txt") else arg)
    return argv


def as_run(argv: list[str], real: bool) -> list[str] | None:
    """What runs for a README line: itself (a training at SMALL size), `validate` for a training whose shape ran
    already, nothing for another command whose shape ran already."""
    if argv[0] == "train" and not real:  # recipe, model, data format and tokenization checked on a few rows
        return ["validate", *(a for a in argv[1:] if a not in ("--resume", "--force")), *SMALL_DATA]
    if not real:
        return None
    if argv[0] == "train" and "--resume" in argv:  # the README's run before it was killed mid-save: unfinished
        run_dir = next(Path(a.split("=", 1)[1]) for a in argv if a.startswith("output.dir="))
        (run_dir / "metrics.json").unlink(missing_ok=True)
    if argv[0] == "eval" and "--tasks" in argv:  # benchmarks: a few items of each task (their scores: other tests)
        argv = [a for i, a in enumerate(argv) if a != "--limit" and argv[i - 1] != "--limit"] + ["--limit", "3"]
    if argv[0] == "generate" and "--max-new-tokens" not in argv:  # a reply's first tokens show the command works
        argv = [*argv, "--max-new-tokens", "16"]
    if argv[0] == "plan":  # two real steps of 4 short completions (one group), on a few rows
        return [*argv, *SMALL_DATA, "training.max_steps=2", "training.batch_size=4", "training.gradient_accumulation=1",
                "rl.max_completion_length=16"]
    return [*argv, *SMALL] if argv[0] == "train" else argv


def test_readme_commands_run_as_written(tmp_path, monkeypatch):
    """Through llmtune's own CLI entry point, in this process: the same code a shell runs, without paying ten
    seconds of library imports for each of the two dozen commands."""
    from llmtune.cli import _attach_dashed_values, _parser, main

    require_shared(SHARED_DATA / "alpaca")
    monkeypatch.chdir(REPO)
    small_text = tmp_path / "valid.txt"
    small_text.write_text((SHARED_DATA / "wikitext-2" / "valid.txt").read_text()[:4000])
    commands = readme_commands()
    real = real_commands(commands)
    for line in commands:  # every line, run or not, is a valid command line
        _parser().parse_known_args(_attach_dashed_values(readme_argv(line, tmp_path, small_text)))

    failures = []
    for chain in chains(commands):
        for line in chain:
            argv = as_run(readme_argv(line, tmp_path, small_text), line in real)
            if argv is None:
                continue
            monkeypatch.setattr(sys, "stdin", io.StringIO("Hello!\n\n"))  # what `chat` reads
            errors = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
                code = main(argv)
            if code != 0:  # the rest of this chain needs what this command makes
                failures.append(f"README command failed (exit {code}): {line}\n{errors.getvalue()[-3000:]}")
                break
    assert not failures, "\n\n".join(failures)


def test_each_command_shape_runs_once_and_the_trainings_it_needs_run_too():
    commands = ["llmtune train a.yaml output.dir=runs/x", "llmtune train b.yaml output.dir=runs/y",
                "llmtune eval runs/x --data d", "llmtune eval runs/y --data e", "llmtune train c.yaml output.dir=runs/z",
                "llmtune merge runs/z --out models/m", "llmtune train a.yaml output.dir=runs/x --resume"]
    assert real_commands(commands) == {commands[0], commands[2], commands[4], commands[5], commands[6]}


def test_commands_that_share_a_run_folder_run_in_one_chain_in_order():
    commands = ["llmtune train a.yaml output.dir=runs/x", "llmtune train b.yaml output.dir=runs/y",
                "llmtune eval runs/x --data d", "llmtune merge runs/y --out models/m", "llmtune push models/m"]
    assert chains(commands) == [[commands[0], commands[2]], [commands[1], commands[3], commands[4]]]


def test_readme_python_session_runs_top_to_bottom(tmp_path):
    """The "From Python" block, as written, at a small size (two steps, a few rows), in a fresh interpreter."""
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


def test_the_readme_test_command_is_ci_and_trains_each_files_shared_run_once(tmp_path):
    """The README's second set-up command is what .ci/run runs, and its pytest options keep a file's tests on one
    worker: a module fixture (a shared training run) is made once, not once per worker. (pytest 9.2 broke
    `--dist loadgroup` this way: pytest-xdist 3.8 still writes the group into a field pytest no longer reads.)"""
    ci = (REPO / ".ci" / "run").read_text()
    commands = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert commands[-1] in ci, "the README's test command and .ci/run differ"
    options = shlex.split(commands[-1].split("-m pytest", 1)[1])
    assert "-n" in options
    log = tmp_path / "setups.log"
    (tmp_path / "test_shared.py").write_text(
        "import pytest, time\n\n"
        "@pytest.fixture(scope='module')\ndef run():\n"
        f"    open({str(log)!r}, 'a').write('trained\\n')\n\n"
        + "".join(f"def test_{i}(run):\n    time.sleep(0.2)\n\n" for i in range(6)))
    for name in ("a", "b"):
        (tmp_path / f"test_other_{name}.py").write_text("import time\n\n" + "".join(
            f"def test_{i}():\n    time.sleep(0.1)\n\n" for i in range(4)))
    done = subprocess.run([sys.executable, "-m", "pytest", *options, "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:]
    assert log.read_text() == "trained\n", "a file's module fixture was made on more than one worker"
