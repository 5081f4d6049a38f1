"""Multiple-choice log-likelihoods with each question computed once.

lm-eval's HF model scores every (question, answer) pair as its own sequence: a 4-choice item runs its question
four times, and the output head computes logits for every position although only the answer's are read. This
subclass fills in `_loglikelihood_tokens` - the step lm-eval's `TemplateLM` leaves to model classes - so that:

- the requests sharing a context run that context once (the "prefix": all of it but its last token), batched
  across questions of similar length and left-padded, with the head on one position only (`logits_to_keep=1`);
- its key/value cache is copied to each of that question's answers (`Cache.reorder_cache` with repeated rows),
  and only the answers - the context's last token, then every answer token but the last - run again, their
  logits giving log P(answer | question) token by token. Answers run in bands of similar length, so padding
  costs little: on a CPU every padded token costs as much as a real one.

Tokenization, truncation, generation and rolling log-likelihoods stay lm-eval's (a request this path does not
handle - a one-token context, an answer longer than the model's window, a seq2seq model - goes to lm-eval's own
`_loglikelihood_tokens`). The scores are the same numbers up to float rounding:
tests/test_benchmarks.py compares them with a direct computation, tests/test_real_benchmarks.py with lm-eval's
own loading and scoring.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

Request = tuple[tuple[str, str], list[int], list[int]]  # (context, continuation) strings, their token ids


class SharedContextLM(HFLM):
    """lm-eval's HF model, scoring each distinct context once per batch of answers."""

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        own: list[int] = []
        for index, (_, context, continuation) in enumerate(requests):
            if self._handles(context, continuation):
                groups.setdefault(tuple(context), []).append(index)
            else:
                own.append(index)
        for context, indices in list(groups.items()):  # a lone answer shares nothing: one forward of lm-eval's
            if len(indices) < 2:
                own += groups.pop(context)
        own.sort()
        if own:  # lm-eval's path, with its own progress bar
            scored = super()._loglikelihood_tokens([requests[i] for i in own], disable_tqdm, override_bs)
            for index, value in zip(own, scored):
                results[index] = value
        contexts = sorted(groups, key=len, reverse=True)  # similar lengths together; the longest (memory) first
        size = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 8)
        with tqdm(total=len(requests) - len(own), desc="Scoring answers (each question once)",
                  disable=disable_tqdm or self.rank != 0) as bar:
            for start in range(0, len(contexts), size):
                chunk = contexts[start:start + size]
                try:
                    scored = self._score(chunk, [groups[c] for c in chunk], requests)
                except TypeError:  # a model class without `logits_to_keep` or a cache: lm-eval's own path
                    indices = [i for c in chunk for i in groups[c]]
                    scored = list(zip(indices, super()._loglikelihood_tokens([requests[i] for i in indices], True)))
                for index, value in scored:
                    results[index] = value
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], value)
                    bar.update(1)
        return results

    def _handles(self, context: list[int], continuation: list[int]) -> bool:
        return (self.backend == "causal" and len(context) >= 2 and len(continuation) >= 1
                and len(context) + len(continuation) <= self.max_length)

    def _score(self, contexts: list[tuple[int, ...]], members: list[list[int]], requests: list[Request]
               ) -> list[tuple[int, tuple[float, bool]]]:
        prefixes = [list(c[:-1]) for c in contexts]
        ids, mask = _left_padded(prefixes, self._pad_id())
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            cache = self._forward(ids, mask, positions, None, keep=1).past_key_values
        rows = sorted(((c, index) for c, indices in enumerate(members) for index in indices),
                      key=lambda row: len(requests[row[1]][2]), reverse=True)
        scored = []
        for band in _length_bands([len(requests[index][2]) for _, index in rows], most=4 * len(contexts)):
            banded = [rows[i] for i in band]
            which = torch.tensor([c for c, _ in banded])
            answers_cache = copy.deepcopy(cache) if band[-1] < len(rows) - 1 else cache  # the last band takes it
            answers_cache.reorder_cache(which.to(self.device))  # one copy of a question's cache per answer
            scored += self._score_answers(banded, contexts, prefixes, mask[which], answers_cache, requests)
        return scored

    def _score_answers(self, rows: list[tuple[int, int]], contexts: list[tuple[int, ...]], prefixes: list[list[int]],
                       prefix_mask: torch.Tensor, cache: Any, requests: list[Request]
                       ) -> list[tuple[int, tuple[float, bool]]]:
        """log P(answer | question) for answers whose questions' cache rows are `cache`'s, in `rows`' order."""
        answers = [list(requests[index][2]) for _, index in rows]
        suffixes = [[contexts[c][-1], *answer[:-1]] for (c, _), answer in zip(rows, answers)]
        suffix_ids, suffix_mask = _left_padded(suffixes, self._pad_id())
        width = suffix_ids.shape[1]
        offsets = (torch.arange(width) - (width - suffix_mask.sum(-1, keepdim=True))).clamp(min=0)
        suffix_positions = torch.tensor([len(prefixes[c]) for c, _ in rows]).unsqueeze(-1) + offsets
        full_mask = torch.cat([prefix_mask, suffix_mask], dim=1)
        with torch.no_grad():
            logits = self._forward(suffix_ids, full_mask, suffix_positions, cache, keep=0).logits
        scored = []
        for row, ((_, index), answer) in enumerate(zip(rows, answers)):
            part = logits[row, width - len(answer):].to(self.softmax_dtype)
            target = torch.tensor(answer, device=part.device).unsqueeze(-1)
            value = float((part.gather(-1, target) - part.logsumexp(-1, keepdim=True)).sum())
            scored.append((index, (value, bool((part.argmax(-1) == target.squeeze(-1)).all()))))
        return scored

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, keep: int) -> Any:
        device = self.device
        return self.model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                          past_key_values=cache, use_cache=True, logits_to_keep=keep)

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0


def _length_bands(lengths: list[int], most: int) -> list[list[int]]:
    """Consecutive positions of `lengths` (longest first) in bands whose shortest is at least 4/5 of their longest
    (or one token shorter), at most `most` long: padded to the band's longest, each wastes little."""
    bands: list[list[int]] = []
    for position, length in enumerate(lengths):
        if bands and len(bands[-1]) < most and length >= min(lengths[bands[-1][0]] * 4 // 5,
                                                               lengths[bands[-1][0]] - 1):
            bands[-1].append(position)
        else:
            bands.append([position])
    return bands


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask
