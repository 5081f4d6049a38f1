"""Runs one UI job's command and records how it ended: `python -m llmtune.ui.job_runner EXIT_FILE -- COMMAND...`.

It sits between the UI and the training process so that the exit code (0, 143 after Stop, 2 after an llmtune
error, -9 -> 137 after kill -9) is on disk even when the UI was closed meanwhile. It ignores SIGTERM and SIGINT
itself - Stop signals the whole process group, and the runner must live on to write the training's exit code.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from llmtune.run.files import write_json


def main(argv: list[str]) -> int:
    exit_file, command = Path(argv[0]), argv[argv.index("--") + 1:]
    child = subprocess.Popen(command)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # after the spawn: the child keeps the default handlers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = child.wait()
    code = 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N
    write_json(exit_file, {"exit_code": code, "ended": time.time()})
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
