"""Rewards for online RL (task grpo): verifiable checks of a completion's text - IFEval-style instruction
constraints, exact-match answers, format patterns, an overlong penalty - and user reward functions loaded from a
file. Pure Python on strings: no model, no training library (rewards from llmtune runs are the grpo task's)."""
