"""What the benchmark scripts share: measuring one configuration in a fresh process, and its peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_in_fresh_process(command: list[str], env: dict | None = None) -> dict | None:
    """Run a benchmark worker; its last stdout line is its JSON result. None (with its stderr shown) on failure."""
    # The repo goes on the worker's import path so a checkout that is not pip-installed (a GPU machine with
    # the packages carried in) benchmarks its own llmtune.
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def reset_peak_rss() -> None:
    """Start peak-RSS accounting from the current memory (Linux: clear_refs 5 resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM missing from /proc/self/status")
