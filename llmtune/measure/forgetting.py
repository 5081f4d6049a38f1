"""The forgetting check: each benchmark's score before and after training, and whether it fell by more than
chance explains.

A drop is flagged when it exceeds the 95% interval of the difference of two independent estimates,
1.96 * sqrt(stderr_before^2 + stderr_after^2). Both runs score the same items, so the paired interval would be
narrower: this flag is the conservative one - a flagged drop is real, an unflagged one may still be.
"""

from __future__ import annotations

import math
from typing import Any

from llmtune.measure.harness import headline_metric

Z_95 = 1.96


def stderr_name(metric: str) -> str:
    """lm-eval's name for a metric's standard error: acc -> acc_stderr, exact_match,strict-match ->
    exact_match_stderr,strict-match."""
    name, comma, filter_name = metric.partition(",")
    return f"{name}_stderr{comma}{filter_name}"


def compare(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per task scored both times: its headline metric before and after, the change, the 95% interval of
    the change and `dropped` when the score fell by more than that interval."""
    rows = []
    for task, row in after.items():
        metric = headline_metric(row)
        if task not in before or metric is None or metric not in before[task]:
            continue
        old, new = before[task][metric], row[metric]
        errors = [before[task].get(stderr_name(metric), math.nan), row.get(stderr_name(metric), math.nan)]
        interval = Z_95 * math.sqrt(sum(e * e for e in errors)) if all(math.isfinite(e) for e in errors) else None
        rows.append({"task": task, "metric": metric, "before": old, "after": new, "change": new - old,
                     "interval_95": interval, "dropped": interval is not None and old - new > interval})
    return rows


def forgetting_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The console table's benchmark rows: task (metric), before, after, change, and the flag."""
    if not rows:
        return []
    width = max(len(f"{r['task']} ({r['metric']})") for r in rows)
    lines = [f"{'benchmark':<{width}}  {'before':>10}  {'after':>10}  {'change':>10}  95% interval"]
    for r in rows:
        interval = f"+/-{r['interval_95']:.4f}" if r["interval_95"] is not None else "-"
        flag = "  DROPPED beyond its interval (forgetting)" if r["dropped"] else ""
        lines.append(f"{r['task'] + ' (' + r['metric'] + ')':<{width}}  {r['before']:10.4f}  {r['after']:10.4f}  "
                     f"{r['change']:+10.4f}  {interval}{flag}")
    return lines
