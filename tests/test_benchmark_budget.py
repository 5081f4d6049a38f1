"""The speed benchmark sizes its runs: every compared run must time at least LONG_ENOUGH, with every system on
the same token budget (benchmarks/speed.py; the runs themselves are faked here, the real ones take half an hour)."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import speed  # noqa: E402 - the benchmarks folder is not a package
from speed_run import MIN_TIMED_STEPS  # noqa: E402


def fake_runs(monkeypatch, tokens_per_s: dict[str, float]) -> list[tuple[str, int]]:
    """Replace the worker processes by runs at fixed speeds (the first step untimed, 200 tokens a step)."""
    calls = []

    def run(command, **_):
        system, budget = command[command.index("--system") + 1], int(command[command.index("--token-budget") + 1])
        calls.append((system, budget))
        steps = max(budget // 200, MIN_TIMED_STEPS + 1)
        return {"tokens_per_s": tokens_per_s[system], "timed_seconds": (steps - 1) * 200 / tokens_per_s[system],
                "steps": steps}

    monkeypatch.setattr(speed, "run_in_fresh_process", run)
    return calls


def test_a_budget_too_short_for_the_machine_is_raised_and_every_system_reruns_on_it(monkeypatch, tmp_path):
    calls = fake_runs(monkeypatch, {"plain_trainer": 100.0, "trl_tuned": 150.0, "llmtune": 300.0, "trl": 5.0})
    args = Namespace(repeats=3, bf16_run="off", with_compile=False, size="cpu", min_seconds=60.0)
    results, budget = speed.measure("sft_lora", tmp_path, 4_000, args)

    assert budget > 4_000
    compared = [r for r in results if not r["reference_only"]]
    assert {r["system"] for r in compared} == {"plain_trainer", "trl_tuned", "llmtune"}
    for r in compared:
        assert len(r["tokens_per_s_rounds"]) == 3  # the short first run was dropped, not counted as a round
        assert r["timed_seconds"] >= speed.LONG_ENOUGH[0] and r["steps"] - 1 >= speed.LONG_ENOUGH[1]
    after_raise = calls[1:]  # llmtune, the fastest, runs first and is the one found short
    assert calls[0] == ("llmtune", 4_000)
    assert {b for system, b in after_raise if system != "trl"} == {budget}
    assert [b for system, b in after_raise if system == "trl"] == [int(budget * speed.REFERENCE_BUDGET_SHARE)]


def test_a_long_enough_budget_is_kept(monkeypatch, tmp_path):
    calls = fake_runs(monkeypatch, {"plain_trainer": 10.0, "llmtune": 20.0})
    args = Namespace(repeats=2, bf16_run="off", with_compile=False, size="cpu", min_seconds=60.0)
    _, budget = speed.measure("qlora", tmp_path, 10_000, args)  # 49 timed steps, 490 s for llmtune
    assert budget == 10_000 and len(calls) == 4


def test_min_seconds_zero_keeps_even_a_short_budget(monkeypatch, tmp_path):
    """A quick look on a short GPU lease: `--min-seconds 0` runs the budget as given."""
    calls = fake_runs(monkeypatch, {"plain_trainer": 1000.0, "llmtune": 2000.0})
    args = Namespace(repeats=1, bf16_run="off", with_compile=False, size="cpu", min_seconds=0.0)
    _, budget = speed.measure("qlora", tmp_path, 4_000, args)
    assert budget == 4_000 and calls == [("llmtune", 4_000), ("plain_trainer", 4_000)]
