"""What `llmtune serve` serves - a causal LM (llmtune.inference.loading.LanguageModel) or a classifier - and the
bounds it keeps requests within."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Limits:
    max_tokens: int = 1024  # the most new tokens one request may ask for
    max_body_bytes: int = 1_000_000  # the largest request body
    max_waiting: int = 256  # requests queued for the model before the server answers 503
    max_inputs: int = 256  # texts in one /v1/classify request


@dataclass
class TextClassifier:
    """A classifier: `predict(texts, pairs)` -> [{'label', 'probabilities'}] (llmtune's Classifier.predict)."""

    predict: Callable[[list[str], list[str] | None], list[dict[str, Any]]]
    labels: list[str]
