"""The speed benchmark sizes its runs: every compared run must time at least LONG_ENOUGH, with every system on
the same token budget (benchmarks/speed.py; the runs themselves are faked here, the real ones take half an hour)."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import speed  # noqa: E402 - the benchmarks folder is not a package
from speed_run import MIN_TIMED_STEPS  # noqa: E402


def fake_runs(monkeypatch, tokens_per_s: dict, data_tokens: int = 10**9) -> list[tuple[str, int]]:
    """Replace the worker processes by runs at given speeds (by system, or "system precision"; a list: one per
    call in turn; None: the run fails, no result): 200 tokens a step, the first step untimed, training ends at the
    budget or when `data_tokens` are used up."""
    calls = []

    def run(command, **_):
        system, budget = command[command.index("--system") + 1], int(command[command.index("--token-budget") + 1])
        precision = command[command.index("--precision") + 1]
        calls.append((system, budget))
        speed_of = tokens_per_s[f"{system} {precision}" if f"{system} {precision}" in tokens_per_s else system]
        if isinstance(speed_of, list):  # one speed per call, in turn
            speed_of = speed_of[sum(called == system for called, _ in calls) - 1]
        if speed_of is None:
            return None
        steps = min(max(-(-budget // 200), MIN_TIMED_STEPS + 1), data_tokens // 200)
        return {"tokens_per_s": speed_of, "timed_seconds": (steps - 1) * 200 / speed_of, "steps": steps,
                "effective_tokens": steps * 200, "budget": budget, "seconds_per_step": 200 / speed_of,
                "parameters": 1, "precision": "fp32", "padding_share": 0.0, "peak_rss_mb": 1.0,
                "held_out_loss": 1.0, "activation_checkpointing": False}

    monkeypatch.setattr(speed, "run_in_fresh_process", run)
    return calls


PEAK = {"fp32": 100.0, "bf16": 50.0}  # GFLOP/s, for the MFU each run's log line shows


def args(**overrides) -> Namespace:
    return Namespace(**{"repeats": 3, "bf16_run": "off", "with_compile": False, "size": "cpu",
                        "min_seconds": 60.0, **overrides})


def test_a_budget_too_short_for_the_machine_is_raised_and_every_system_reruns_on_it(monkeypatch, tmp_path):
    calls = fake_runs(monkeypatch, {"plain_trainer": 100.0, "trl_tuned": 150.0, "llmtune": 300.0, "trl": 5.0})
    results, budget = speed.measure("sft_lora", tmp_path, 4_000, args(), PEAK)

    assert budget > 4_000
    compared = [r for r in results if not r["reference_only"]]
    assert {r["system"] for r in compared} == {"plain_trainer", "trl_tuned", "llmtune"}
    for r in compared:
        assert len(r["tokens_per_s_rounds"]) == 3  # the short first run was dropped, not counted as a round
        assert r["budget"] == budget
        shortest = r["shortest_round"]
        assert shortest["timed_seconds"] >= speed.LONG_ENOUGH[0] and shortest["steps"] - 1 >= speed.LONG_ENOUGH[1]
    after_raise = calls[1:]  # llmtune, the fastest, runs first and is the one found short
    assert calls[0] == ("llmtune", 4_000)
    assert {b for system, b in after_raise if system != "trl"} == {budget}
    assert [b for system, b in after_raise if system == "trl"] == [int(budget * speed.REFERENCE_BUDGET_SHARE)]


def test_a_short_run_late_in_the_first_round_restarts_the_round(monkeypatch, tmp_path):
    """The compiled run, fastest here, runs after llmtune's plain run; the plain Trainer fails once (no result)."""
    calls = fake_runs(monkeypatch, {"plain_trainer": [None, 100.0], "llmtune auto": 200.0, "llmtune compile": 2000.0})
    results, budget = speed.measure("qlora", tmp_path, 30_000, args(with_compile=True, repeats=2), PEAK)

    assert calls[:2] == [("llmtune", 30_000), ("llmtune", 30_000)]  # llmtune auto, then compiled: found short
    assert all(b == budget > 30_000 for _, b in calls[2:])
    rounds = {r["system"]: len(r["tokens_per_s_rounds"]) for r in results}
    assert rounds == {"llmtune": 2, "llmtune (torch.compile)": 2, "plain_trainer": 1}
    assert all(r["budget"] == budget for r in results)


def short_rows(results: list[dict], budget: int) -> list[str]:
    """The systems the results table flags short."""
    speed.summarize(results, {"fp32": 1.0, "bf16": 1.0}, "plain_trainer")
    block = {"title": "t", "token_budget": budget, "results": results, "matmul_peak_gflops": {"fp32": 1, "bf16": 1},
             "date": "d", "machine": "m"}
    return [line.split("|")[1].strip() for line in speed.render_workload("qlora", block).splitlines()
            if "(short)" in line]


def test_a_run_that_used_all_its_data_keeps_the_budget_and_is_flagged_short(monkeypatch, tmp_path):
    calls = fake_runs(monkeypatch, {"plain_trainer": 100.0, "llmtune": 1000.0}, data_tokens=20_000)
    results, budget = speed.measure("qlora", tmp_path, 30_000, args(repeats=1), PEAK)
    assert budget == 30_000 and len(calls) == 2  # raising would not help: training stops when the data ends
    assert short_rows(results, budget) == ["llmtune"]  # 19.9 s; the plain Trainer's 199 s is long enough


def test_a_system_with_any_short_round_is_flagged_not_only_a_short_median(monkeypatch, tmp_path):
    """The machine sped up after the first round: one of llmtune's later rounds ran faster, and shorter."""
    fake_runs(monkeypatch, {"plain_trainer": 50.0, "llmtune": [100.0, 120.0, 250.0]})
    results, budget = speed.measure("qlora", tmp_path, 8_000, args(repeats=3), PEAK)
    assert budget == 8_000
    llmtune = next(r for r in results if r["system"] == "llmtune")
    assert llmtune["timed_seconds"] >= 60 and llmtune["shortest_round"]["timed_seconds"] < 60  # median 65 s, one 31 s
    assert short_rows(results, budget) == ["llmtune"]


@pytest.mark.parametrize(("min_seconds", "raised"), [(0.0, False), (60.0, True)])
def test_min_seconds_zero_keeps_even_a_short_budget(monkeypatch, tmp_path, min_seconds, raised):
    """A quick look on a short GPU lease: `--min-seconds 0` runs the budget as given."""
    calls = fake_runs(monkeypatch, {"plain_trainer": 1000.0, "llmtune": 2000.0})
    _, budget = speed.measure("qlora", tmp_path, 4_000, args(repeats=1, min_seconds=min_seconds), PEAK)
    if raised:
        assert budget > 4_000 and calls[0] == ("llmtune", 4_000) and len(calls) == 3
    else:
        assert budget == 4_000 and calls == [("llmtune", 4_000), ("plain_trainer", 4_000)]


def test_the_1b_workload_is_for_a_gpu_and_every_system_trains_the_one_saved_model(tmp_path, monkeypatch, capsys):
    """sft_lora_1b: a 1B-class Llama built from a config (random weights), saved once, loaded by every system."""
    import functools

    import speed_workloads

    monkeypatch.setattr(sys, "argv", ["speed.py", "--workloads", "sft_lora_1b", "--size", "cpu"])
    with pytest.raises(SystemExit):
        speed.main()
    assert "--workloads sft_lora_1b: no cpu budget" in capsys.readouterr().err
    assert speed_workloads.WORKLOADS["sft_lora_1b"].token_budget["gpu"] > 0
    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    monkeypatch.setattr(speed_workloads, "random_llama", functools.partial(speed_workloads.random_llama, **tiny))
    speed_workloads.prepare("sft_lora_1b", tmp_path, samples=8)
    run = Namespace(batch_size=2, learning_rate=1e-4, precision="fp32", compile=False)
    for system in ("plain_trainer", "trl_tuned", "llmtune"):
        model = speed_workloads.build("sft_lora_1b", system, run, tmp_path).model
        assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2, system
