"""Cache keys for tokenized datasets that cost milliseconds instead of pickling the tokenizer.

datasets names each `map` result by hashing the function it applies - with a tokenizer inside, that means
serializing the whole tokenizer (its vocabulary) on every call: about 0.2 s for BERT's, on every split of every
run, cached or not. llmtune passes the name itself: the input dataset's own fingerprint, the tokenizer's content
(its serialized tokenizer.json, special tokens and chat template, hashed once), the source of the module that does
the step, and every setting that shapes the output. Anything that changes the tokens - data, tokenizer, settings,
llmtune's own code - changes the key, so a stale cache is never read.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from datasets import Dataset


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything in a tokenizer that decides its output (5-30 ms; not cached on the object, which a
    caller may change between uses)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps([type(tokenizer).__name__, tokenizer.special_tokens_map, tokenizer.chat_template,
                        getattr(tokenizer, "padding_side", None), getattr(tokenizer, "truncation_side", None)],
                       sort_keys=True, default=str)
    return hashlib.sha256((content + extra).encode()).hexdigest()[:32]


@functools.cache
def source_fingerprint(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def derived_fingerprint(rows: Dataset, step: str, code: str, tokenizer: Any, **settings: Any) -> str:
    """The cache key of `step` (done by the module at path `code`) applied to `rows` with this tokenizer and these
    settings."""
    key = json.dumps([rows._fingerprint, step, source_fingerprint(code), tokenizer_fingerprint(tokenizer), settings],
                     sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:32]
