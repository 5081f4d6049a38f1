"""Measuring a model on standard benchmarks: lm-evaluation-harness on the model exactly as llmtune loads it, the
offline task definitions for the benchmark files (lm_eval_tasks/), and the before -> after forgetting check."""
