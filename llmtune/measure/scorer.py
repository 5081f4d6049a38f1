"""Multiple-choice log-likelihoods with each question computed once, its answers beside it.

lm-eval's HF model scores every (question, answer) pair as its own sequence: a 4-choice item runs its question
four times, and the output head computes logits for every position although only the answers' are read. This
subclass fills in `_loglikelihood_tokens` - the step lm-eval's `TemplateLM` leaves to model classes - so that each
question runs once, as a *tree*: its context, then every answer (all but its last token) one after another. A 4D
attention mask lets each answer see the whole context and its own earlier tokens but no other answer, and each
answer's position ids restart right after the context, so every answer token sees exactly what it would see in
its own sequence; the context's last logits predict every answer's first token.

Trees are packed into rows (the longest open a row each, the shortest fill the room they leave; no tree sees
another), so there is little padding - on a CPU every padded token costs as much as a real one - and the output
head runs only at the positions whose logits are read: a hook on the head's input keeps just those hidden states.

Not every model class honours a custom 4D mask, so the widest question and the fullest row of the first batches
are also scored by lm-eval's own path, until a batch has both answers side by side and trees side by side: if the
two paths disagree, that model is scored by lm-eval's path throughout, with a warning. Tokenization, truncation,
generation and rolling log-likelihoods stay lm-eval's, and so does any request this path does not handle (an
answer that needs the context cut to fit the model's window, a sequence longer than a sliding-window attention's
window, a seq2seq model). The scores are the same numbers up to float rounding:
tests/test_benchmarks.py compares them with lm-eval's HF model, tests/test_real_benchmarks.py with lm-eval's own
loading and scoring.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

logger = logging.getLogger(__name__)

Request = tuple[tuple[str, str], list[int], list[int]]  # (context, continuation) strings, their token ids
Question = tuple[tuple[int, ...], list[int]]  # a context's token ids, the indices of the requests that share it
Scored = list[tuple[int, tuple[float, bool]]]  # (request index, (log-likelihood, is greedy))


@dataclass
class Tree:
    """One question placed in a row: its context at `offset`, then its answers (all but each one's last token)."""

    members: list[int]  # the requests (one per answer), in the order their answers follow the context
    offset: int
    context: int  # the context's length
    starts: list[int]  # where each answer starts in the row
    end: int  # where the tree ends in the row

    def reads(self, answer_lengths: list[int]) -> list[list[int]]:
        """For each answer, the row positions whose logits predict its tokens."""
        return [[self.offset + self.context - 1, *range(start, start + n - 1)]
                for start, n in zip(self.starts, answer_lengths)]


class SharedContextLM(HFLM):
    """lm-eval's HF model, scoring each question once with all its answers beside it."""

    _trees_agree: bool | None = None  # whether this model's tree scores equal lm-eval's; None: not checked yet

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
        if own:  # lm-eval's path, with its own progress bar
            scored = super()._loglikelihood_tokens([requests[i] for i in own], disable_tqdm, override_bs)
            for index, value in zip(own, scored):
                results[index] = value
        rows = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 8)
        with tqdm(total=len(requests) - len(own), desc="Scoring answers (each question once)",
                  disable=disable_tqdm or self.rank != 0) as bar:
            for batch in packed(list(groups.items()), requests, rows):
                for index, value in self._score_or_hand_back(batch, requests):
                    results[index] = value
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], value)
                    bar.update(1)
        return results

    def _handles(self, context: list[int], continuation: list[int]) -> bool:
        # A sliding-window layer sees only its last `window` tokens: the mask built here does not, so a sequence
        # longer than the window is lm-eval's (whose model builds its own masks).
        window = getattr(self.model.config, "sliding_window", None) or self.max_length
        return (self.backend == "causal" and len(context) >= 1 and len(continuation) >= 1
                and len(context) + len(continuation) <= min(self.max_length, window))

    def _score_or_hand_back(self, batch: list[list[Tree]], requests: list[Request]) -> Scored:
        if self._trees_agree is None:  # not yet checked: does this model honour the trees' mask?
            try:
                scored = self._score_trees(batch, requests)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # model code that cannot take the mask, the positions or the hook
                self._trees_agree = self._warn_and_hand_back(f"it raised {type(error).__name__}: {error}")
            else:
                if self._agrees_with_lm_eval(batch, scored, requests):
                    return scored
        elif self._trees_agree:
            return self._score_trees(batch, requests)
        indices = [i for row in batch for tree in row for i in tree.members]
        return list(zip(indices, super()._loglikelihood_tokens([requests[i] for i in indices], True)))

    def _agrees_with_lm_eval(self, batch: list[list[Tree]], scored: Scored, requests: list[Request]) -> bool:
        """Scores the batch's widest tree and its fullest row lm-eval's way too. The check is settled by a batch
        where both could go wrong - answers side by side and trees side by side; until then each batch is checked."""
        widest = max((tree for row in batch for tree in row), key=lambda tree: len(tree.members))
        fullest = max(batch, key=len)
        members = list(dict.fromkeys([*widest.members, *(i for tree in fullest for i in tree.members)]))
        ours = dict(scored)
        theirs = super()._loglikelihood_tokens([requests[i] for i in members], True)
        tolerance = 1e-4 if self._dtype() == torch.float32 else 2e-2  # half precision rounds per batch shape
        if all(abs(ours[i][0] - value) <= tolerance * max(1.0, abs(value)) for i, (value, _) in zip(members, theirs)):
            if len(widest.members) > 1 and len(fullest) > 1:
                self._trees_agree = True
            return True
        self._trees_agree = self._warn_and_hand_back("its log-likelihoods differ from lm-eval's")
        return False

    def _warn_and_hand_back(self, why: str) -> bool:
        logger.warning("%s cannot score a question's answers side by side (%s; its attention may not take a custom "
                       "4D mask): every answer is scored as its own sequence, as lm-eval does - the same scores, "
                       "more slowly.", type(self.model).__name__, why)
        return False

    def _score_trees(self, batch: list[list[Tree]], requests: list[Request]) -> Scored:
        ids, positions, mask = tree_inputs(batch, requests, self._pad_id(), self._dtype())
        trees = [tree for row in batch for tree in row]
        rows, columns = [], []
        for r, row in enumerate(batch):
            for tree in row:
                for reading in tree.reads([len(requests[i][2]) for i in tree.members]):
                    rows += [r] * len(reading)
                    columns += reading
        logits = self._logits_at(ids, positions, mask, torch.tensor(rows), torch.tensor(columns))
        scored, at = [], 0  # the logits are in `trees`' order, each answer's in turn
        for tree in trees:
            for index in tree.members:
                answer = requests[index][2]
                part = torch.log_softmax(logits[at:at + len(answer)], dim=-1, dtype=self.softmax_dtype)  # as lm-eval
                at += len(answer)
                target = torch.tensor(answer, device=part.device).unsqueeze(-1)
                value = float(part.gather(-1, target).sum())
                scored.append((index, (value, bool((part.argmax(-1) == target.squeeze(-1)).all()))))
        return scored

    def _logits_at(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
                   columns: torch.Tensor) -> torch.Tensor:
        """The logits at (rows[k], columns[k]) only: a hook hands the output head just those hidden states, so it
        never computes the context's or the padding's logits (if a model skips the hook, all are computed)."""
        device, selected = self.device, []

        def select(module: torch.nn.Module, args: tuple) -> tuple | None:
            if not args or args[0].dim() != 3:  # not the (rows, positions, hidden) input this expects: leave it
                return None
            selected.append(True)
            hidden = args[0]  # on the head's device, which a model split over GPUs may not share with the input
            return (hidden[rows.to(hidden.device), columns.to(hidden.device)].unsqueeze(0), *args[1:])

        head = self.model.get_output_embeddings()
        hook = head.register_forward_pre_hook(select) if head is not None else None
        mixed = self.mixed_precision_dtype  # lm-eval's own forward runs under this autocast: so does this one
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=mixed, enabled=mixed is not None):
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    position_ids=positions.to(device), use_cache=False).logits
        finally:
            if hook is not None:
                hook.remove()
        return logits[0] if selected else logits[rows.to(logits.device), columns.to(logits.device)]

    def _dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype  # what the layers compute in, 4-bit bases included

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0


def tree_length(question: Question, requests: list[Request]) -> int:
    context, members = question
    return len(context) + sum(len(requests[i][2]) - 1 for i in members)


def packed(questions: list[Question], requests: list[Request], rows: int) -> Iterator[list[list[Tree]]]:
    """Batches of at most `rows` rows, each as wide as its batch's longest tree: the longest trees left open a row
    each, then the shortest left fill the room those rows leave (first row with room)."""
    waiting = deque(sorted(questions, key=lambda q: tree_length(q, requests), reverse=True))
    while waiting:
        width = tree_length(waiting[0], requests)
        batch: list[list[Tree]] = []
        while waiting and len(batch) < rows:
            batch.append([_tree(waiting.popleft(), requests, 0)])
        free = [width - row[0].end for row in batch]  # room left in each row
        while waiting:
            shortest = tree_length(waiting[-1], requests)
            row = next((r for r, room in enumerate(free) if room >= shortest), None)
            if row is None:
                break
            batch[row].append(_tree(waiting.pop(), requests, width - free[row]))
            free[row] = width - batch[row][-1].end
        yield batch


def _tree(question: Question, requests: list[Request], offset: int) -> Tree:
    context, members = question
    starts, at = [], offset + len(context)
    for index in members:
        starts.append(at)
        at += len(requests[index][2]) - 1
    return Tree(members, offset, len(context), starts, at)


def tree_inputs(batch: list[list[Tree]], requests: list[Request], pad: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded token ids, position ids and the additive (rows, 1, query, key) attention mask of packed trees:
    each context causal, each answer seeing its context and its own earlier tokens, padding only itself (a query
    that sees nothing would leave its softmax undefined)."""
    width = max(tree.end for row in batch for tree in row)
    ids = torch.full((len(batch), width), pad)
    positions = torch.zeros(len(batch), width, dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(batch), 1, 1)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for r, row in enumerate(batch):
        for tree in row:
            context_end = tree.offset + tree.context
            ids[r, tree.offset:context_end] = torch.tensor(requests[tree.members[0]][1])
            positions[r, tree.offset:context_end] = torch.arange(tree.context)
            allowed[r, tree.offset:context_end, tree.offset:context_end] = causal[:tree.context, :tree.context]
            for index, start, end in zip(tree.members, tree.starts, [*tree.starts[1:], tree.end]):
                n = end - start
                ids[r, start:end] = torch.tensor(requests[index][2][:-1], dtype=torch.long)
                positions[r, start:end] = torch.arange(tree.context, tree.context + n)
                allowed[r, start:end, tree.offset:context_end] = True
                allowed[r, start:end, start:end] = causal[:n, :n]
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids, positions, mask.unsqueeze(1)
