"""What a run prints: one training progress bar (live loss, learning rate, throughput, ETA) on a terminal, or plain
lines where the output is a file or a pipe (CI, `> log`); one line per evaluation; a before -> after table at the end.

The libraries' own progress bars, raw Trainer dicts and load reports are turned off or into one line of llmtune's,
unless `-v` (LLMTUNE_VERBOSE=1) asks for everything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from transformers import TrainerCallback

logger = logging.getLogger("llmtune")

VERBOSE_ENV = "LLMTUNE_VERBOSE"
EVALUATIONS_FILE = "evaluations.jsonl"  # one line per evaluation, written as the run goes
PROGRESS_FILE = "progress.jsonl"  # the run as it goes, for `llmtune ui`: steps (every few seconds) and every log
_TICK_SECONDS = 2.0
_TIMINGS = ("runtime", "per_second", "epoch", "preparation_time", "total_flos")


def is_timing(key: str) -> bool:
    """Whether a metric or log key times an evaluation or the run ('eval_runtime', 'after_samples_per_second', ...)
    rather than scoring the model; the throughput the console adds to each training log is a curve of its own."""
    return key.endswith(_TIMINGS) and not key.startswith("throughput_")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_libraries() -> None:
    """Turn off the libraries' progress bars (tokenizing, loading weights, writing shards); keep the Hub's download
    bars, since a download is long work. A no-op with -v. (The libraries' deprecation warnings, which speak to
    llmtune's developers rather than its users, are silenced by the CLI alone: a Python user keeps them.)"""
    if verbose():
        return
    import datasets
    import huggingface_hub
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()  # transformers turns the Hub's off with its own
    logging.getLogger("transformers.modeling_utils").addFilter(_one_line_load_report)


_REPORT_ROW = re.compile(r"^(\S+)\s*\|\s*(?:\x1b\[[0-9;]*m)?([A-Z_]+)")


def _one_line_load_report(record: logging.LogRecord) -> bool:
    """transformers' LOAD REPORT table -> one line: which weights the checkpoint did not have (a new head, usually)."""
    message = record.getMessage()
    if "LOAD REPORT" not in message:
        return True
    rows: dict[str, list[str]] = {}
    for line in message.splitlines():
        match = _REPORT_ROW.match(line.strip())
        if match and match.group(1) != "Key":
            rows.setdefault(match.group(2).lower(), []).append(match.group(1))
    if not rows:
        return True  # a layout this parser does not know: show the report as it is
    heads_only = set(rows) == {"missing"} and all(_is_head(key) for key in rows["missing"])
    if heads_only:
        record.msg = f"New head, initialised at random (not in the checkpoint): {', '.join(rows['missing'])}"
        record.levelno, record.levelname = logging.INFO, "INFO"
    else:
        listed = "; ".join(f"{status}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                           for status, keys in rows.items())
        record.msg = f"The checkpoint's weights do not match the model ({listed}); -v shows transformers' report"
    record.args = ()
    return True


def _is_head(key: str) -> bool:
    return key.split(".")[0] in {"classifier", "score", "pre_classifier", "lm_head", "v_head"}


class Console(TrainerCallback):
    """Training progress on the main process: a tqdm bar on a terminal, plain lines otherwise; one line per
    evaluation. It also adds the throughput since the previous log to each training log entry, so trainer_state.json
    and the report have it."""

    def __init__(self, run_dir: Path | None = None, stream: TextIO | None = None) -> None:
        self.evaluations = Path(run_dir) / EVALUATIONS_FILE if run_dir is not None else None
        self.progress = Path(run_dir) / PROGRESS_FILE if run_dir is not None else None
        self._last_tick = 0.0
        self.stream = stream or sys.stderr
        self.bar = None
        self._mark: tuple[float, int, float] | None = None  # time, step, tokens seen at the previous training log
        self._session: tuple[float, int] | None = None

    @property
    def interactive(self) -> bool:
        return hasattr(self.stream, "isatty") and self.stream.isatty()

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        now = time.perf_counter()
        self._mark = (now, state.global_step, float(state.num_input_tokens_seen or 0))
        self._session = (now, state.global_step)
        self._record(state, event="begin")
        if self.interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", file=self.stream,
                            dynamic_ncols=True, desc="train")
        else:
            logger.info("Training: %d steps", state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        self._tick(state, "step")

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.bar is not None:
            self.bar.set_description("evaluating", refresh=False)
        self._tick(state, "evaluating")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.bar is not None:
            self.bar.set_description("train", refresh=False)
        runtime = next((v for k, v in (metrics or {}).items() if k.endswith("_runtime")), 0.0)
        if self._mark is not None and self._session is not None:  # evaluation time is not training throughput
            self._mark = (self._mark[0] + runtime, *self._mark[1:])
            self._session = (self._session[0] + runtime, self._session[1])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs and self._mark is not None:
            self._training_line(args, state, logs)
        latest = state.log_history[-1] if state.log_history else {}
        shown = latest if all(latest.get(key) == value for key, value in logs.items()) else logs  # + throughput
        self._record(state, log={k: v for k, v in shown.items() if isinstance(v, int | float | str)})
        if "loss" in logs:
            return
        if (prefix := _eval_prefix(logs)) is not None:
            values = _evaluation_values(prefix, logs)
            self._say(_evaluation_line(prefix, values, logs, state))
            if self.evaluations is not None:  # as it happens: a sweep prunes on these; a user can follow a long run
                with self.evaluations.open("a") as handle:
                    handle.write(json.dumps({"step": state.global_step, "split": prefix.rstrip("_"),
                                             **values}) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if state.is_world_process_zero:
            self._record(state, event="end")

    def _tick(self, state, event: str) -> None:
        """Where the run is, every few seconds at most (on the main process)."""
        if state.is_world_process_zero and time.time() - self._last_tick >= _TICK_SECONDS:
            self._record(state, event=event)

    def _record(self, state, **entry: Any) -> None:
        """One line of progress.jsonl (appended: a reader never sees a half-rewritten file, only maybe a half line)."""
        if self.progress is None:
            return
        self._last_tick = time.time()
        line = {"time": round(self._last_tick, 3), "step": state.global_step, "max_steps": state.max_steps, **entry}
        try:
            with self.progress.open("a") as handle:
                handle.write(json.dumps(line) + "\n")
        except OSError:
            pass  # progress for onlookers must never stop the run

    def _training_line(self, args, state, logs: dict[str, Any]) -> None:
        now = time.perf_counter()
        then, step, tokens = self._mark
        steps = state.global_step - step
        seconds = max(now - then, 1e-9)
        speed = {"samples_per_second": steps * args.train_batch_size * args.gradient_accumulation_steps
                 * args.world_size / seconds}
        if "num_input_tokens_seen" in logs:
            speed["tokens_per_second"] = (logs["num_input_tokens_seen"] - tokens) / seconds
        self._mark = (now, state.global_step, float(logs.get("num_input_tokens_seen", tokens)))
        if steps and state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update({f"throughput_{k}": round(v, 3) for k, v in speed.items()})
        rate = (f"{speed['tokens_per_second']:,.0f} tok/s" if "tokens_per_second" in speed
                else f"{speed['samples_per_second']:.1f} samples/s")
        # GRPO's loss hovers near 0 by construction (advantages are centred in each group): its reward is the signal.
        progress = ("reward", f"{logs['reward']:.4f}") if "reward" in logs else ("loss", f"{logs['loss']:.4f}")
        fields = {progress[0]: progress[1], "lr": f"{logs.get('learning_rate', 0):.2e}", "speed": rate}
        if self.bar is not None:
            self.bar.set_description("train", refresh=False)
            self.bar.set_postfix(fields, refresh=True)
            return
        started, first = self._session
        done = state.global_step - first
        eta = (now - started) / done * (state.max_steps - state.global_step) if done else 0.0
        self._say(f"step {state.global_step}/{state.max_steps}  {progress[0]} {progress[1]}  lr {fields['lr']}  "
                  f"{rate}  eta {_duration(eta)}")

    def _say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            logger.info(line)


def attach_console(trainer: Any, run_dir: Path | None = None) -> None:
    """Replace the Trainer's own progress output (a tqdm bar per evaluation, raw dicts) with llmtune's console."""
    from transformers.trainer import DEFAULT_PROGRESS_CALLBACK
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(DEFAULT_PROGRESS_CALLBACK)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Console(run_dir))


def _eval_prefix(logs: dict[str, Any]) -> str | None:
    runtime = next((key for key in logs if key.endswith("_runtime") and not key.startswith("train")), None)
    return runtime.removesuffix("runtime") if runtime else None


def _evaluation_values(prefix: str, logs: dict[str, Any]) -> dict[str, float]:
    """An evaluation's scores by name. trl's preference trainers log theirs as 'eval_*' whatever the prefix."""
    values = {}
    for key, value in logs.items():
        name = next((key.removeprefix(p) for p in (prefix, "eval_") if key.startswith(p)), None)
        if name is not None and not is_timing(key) and isinstance(value, int | float) and not isinstance(value, bool):
            values.setdefault(name, value)
    return values


def _evaluation_line(prefix: str, values: dict[str, float], logs: dict[str, Any], state) -> str:
    when = {"after_": "after training", "test_": "test set"}.get(prefix, f"step {state.global_step}")
    shown = "  ".join(f"{name} {_number(value)}" for name, value in values.items())
    return f"eval ({when}): {shown}  [{_duration(logs.get(prefix + 'runtime', 0.0))}]"


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def summary_table(metrics: dict[str, Any], run_dir: Path) -> str:
    """The end-of-run table: each evaluation metric before and after training, and the change."""
    before, after = metrics.get("before", {}), metrics.get("after", {})
    names = [n for n, v in after.items() if isinstance(v, int | float) and not is_timing(n)]
    lines = []
    if names:
        width = max(len(n) for n in names + ["metric"])
        lines.append(f"{'metric':<{width}}  {'before':>10}  {'after':>10}  {'change':>10}")
        for name in names:
            old = before.get(name)
            change = f"{after[name] - old:+10.4f}" if isinstance(old, int | float) else f"{'':>10}"
            old_text = f"{old:10.4f}" if isinstance(old, int | float) else f"{'-':>10}"
            lines.append(f"{name:<{width}}  {old_text}  {after[name]:10.4f}  {change}")
    if metrics.get("benchmarks", {}).get("forgetting"):
        from llmtune.measure.forgetting import forgetting_lines

        lines += forgetting_lines(metrics["benchmarks"]["forgetting"])
    if metrics.get("held_out"):
        from llmtune.tasks.grpo_heldout import held_out_lines

        lines += held_out_lines(metrics["held_out"])
    lines.append(f"Run saved in {run_dir}")
    return "\n".join(lines)
