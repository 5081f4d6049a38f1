"""Generation for `llmtune serve`: one request's text, whole or as server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from llmtune.inference.generation import stop_token_ids
from llmtune.inference.loading import LanguageModel
from llmtune.run.precision import evaluation_precision
from llmtune.ship.serve_requests import ApiError

logger = logging.getLogger(__name__)

Shape = Callable[[str, "str | None"], dict]  # (text, finish reason) -> one event of the stream
RunOnWorker = Callable[[Callable[[], Any]], Awaitable[Any]]


@dataclass
class Job:
    ids: list[int]  # prompt token ids
    max_new: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]


class Cancelled:
    """A stopping criterion that ends generation when the client has gone (a closed stream)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def generate(lm: LanguageModel, job: Job, streamer: Any = None, cancel: Cancelled | None = None) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens). Greedy at temperature 0, as `llmtune generate` is."""
    from transformers import StoppingCriteriaList

    model, tokenizer = lm.model, lm.tokenizer
    options: dict[str, Any] = {"max_new_tokens": job.max_new, "pad_token_id": tokenizer.pad_token_id}
    if job.temperature == 0:
        options["do_sample"] = False
    else:
        options.update(do_sample=True, temperature=job.temperature, top_p=job.top_p)
    if job.stops:
        options.update(stop_strings=job.stops, tokenizer=tokenizer)
    if cancel is not None:
        options["stopping_criteria"] = StoppingCriteriaList([cancel])
    if job.seed is not None:
        torch.manual_seed(job.seed)  # one generation at a time: the global generator is this request's
    ids = torch.tensor([job.ids], device=model.device)
    with torch.inference_mode(), evaluation_precision(lm.precision, model.device.type):
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **options)
    new = output[0, ids.shape[1]:].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    cut = cut_at_stop(text, job.stops)
    stopped = cut is not None or (bool(new) and new[-1] in stop_token_ids(model))
    return (text if cut is None else text[:cut]), ("stop" if stopped or len(new) < job.max_new else "length"), len(new)


def cut_at_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could be the start of a stop string (a stream must not send them yet)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def stream_events(lm: LanguageModel, job: Job, shape: Shape, run: RunOnWorker, first: dict | None = None
                        ) -> AsyncIterator[str]:
    """Server-sent events: text as it is generated (never a piece of a stop string), then the finish and [DONE].

    A failure after the first event can no longer change the status code: it ends the stream with an error event
    and [DONE], so a client neither hangs nor takes the text so far for a whole reply."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(lm.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    cancel = Cancelled()

    def work() -> tuple[str, str, int]:
        try:
            return generate(lm, job, streamer, cancel)
        finally:
            streamer.end()  # also when generation failed: the reader below must not wait for more text

    done = asyncio.ensure_future(run(work))
    logged = False
    try:
        if first is not None:
            yield event(first)
        try:
            async for piece in _pieces(streamer, job.stops, done, shape):
                yield piece
        except Exception as error:  # whatever it was, the client must hear that the reply broke off
            logged = True
            logger.error("A streamed reply failed after it had begun (%s).", type(error).__name__, exc_info=error)
            yield event(_stream_error(error))
        yield event("[DONE]")
    finally:
        cancel.event.set()  # the client left (or we are done): stop generating for nobody
        done.add_done_callback(lambda future: _collect(future, log=not logged))


async def _pieces(streamer: Any, stops: list[str], done: asyncio.Future, shape: Shape) -> AsyncIterator[str]:
    sent, seen = 0, ""
    while True:
        piece = await asyncio.to_thread(next, streamer, None)
        if piece is None:
            break
        seen += piece
        cut = cut_at_stop(seen, stops)
        ready = cut if cut is not None else len(seen) - held_back(seen, stops)
        if ready > sent:
            yield event(shape(seen[sent:ready], None))
            sent = ready
        if cut is not None:
            break
    text, finish, _ = await done
    if len(text) > sent:  # what the streamer held back at the end (or a stop string's tail)
        yield event(shape(text[sent:], None))
    yield event(shape("", finish))


def _stream_error(error: Exception) -> dict[str, Any]:
    if isinstance(error, ApiError):  # e.g. the queue was full by the time the stream reached it
        return error.payload()
    return {"error": {"message": f"Generation failed after the reply had begun ({type(error).__name__}); the text "
                                 "sent so far is incomplete. The server's log has the details.",
                      "type": "server_error", "code": "generation_failed", "param": None}}


def _collect(done: asyncio.Future, log: bool) -> None:
    """Take a finished generation's failure, so asyncio does not report it as never retrieved, and log it when the
    stream ended before hearing of it (the client had left)."""
    failure = None if done.cancelled() else done.exception()
    if failure is not None and log:
        logger.error("A streamed generation failed after its client had left.", exc_info=failure)
