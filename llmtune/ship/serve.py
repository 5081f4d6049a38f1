"""`llmtune serve`: a run or model over HTTP - OpenAI-compatible for causal LMs, `/v1/classify` for classifiers.

Built on FastAPI + uvicorn rather than `transformers serve`: that server loads Hub models by id, while a run here is
often an adapter on its base with the run's own chat template, stop tokens and evaluation precision (loaded by the
CLI exactly as `llmtune generate` loads it, so greedy replies match), classifiers need an endpoint of their own, and
the server needs an API key and bounds on what one request may ask for.

One worker thread owns the model: requests wait their turn in arrival order (none is dropped while fewer than
`max_waiting` wait; beyond that the answer is 503, retry later) and each generation runs alone, so a seed gives the
same sample every time. Errors use OpenAI's shape, `{"error": {"message", "type", "code", "param"}}`, with 4xx codes
for what the client sent; the server keeps serving after any of them. The API key is compared in constant time and
never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmtune.inference.generation import encode_prompt, stop_token_ids
from llmtune.run.precision import evaluation_precision

logger = logging.getLogger(__name__)


@dataclass
class Limits:
    max_tokens: int = 1024  # the most new tokens one request may ask for
    max_body_bytes: int = 1_000_000  # the largest request body
    max_waiting: int = 256  # requests queued for the model before the server answers 503
    max_inputs: int = 256  # texts in one /v1/classify request


@dataclass
class LanguageModel:
    """A causal LM as `llmtune generate` loads it."""

    model: torch.nn.Module
    tokenizer: Any
    chat: bool  # apply the chat template (the run's own) to messages
    precision: str  # the run's evaluation precision

    @property
    def context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or self.tokenizer.model_max_length)


@dataclass
class TextClassifier:
    """A classifier: `predict(texts, pairs)` -> [{'label', 'probabilities'}] (llmtune's Classifier.predict)."""

    predict: Callable[[list[str], list[str] | None], list[dict[str, Any]]]
    labels: list[str]


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                503: "server_busy"}.get(self.status, "invalid_request_error")
        return JSONResponse({"error": {"message": self.message, "type": kind, "code": self.code, "param": self.param}},
                            status_code=self.status)


# --- requests ----------------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields this server does not use (user, logprobs...)


class _Sampling(_Request):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "'stop' takes up to 4 non-empty strings.", "invalid_value", "stop")
        return stops


class _Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text ones carry meaning to a text model
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class ClassifyRequest(_Request):
    model: str | None = None
    input: str | list[str]
    pairs: list[str] | None = None


# --- generation --------------------------------------------------------------------------------------------


@dataclass
class _Generation:
    ids: list[int]  # prompt token ids
    max_new: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]


class _Cancelled:
    """A stopping criterion that ends generation when the client has gone (a closed stream)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _generate(lm: LanguageModel, job: _Generation, streamer: Any = None, cancel: _Cancelled | None = None
              ) -> tuple[str, str, int]:
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
    cut = _cut_at_stop(text, job.stops)
    stopped = cut is not None or (bool(new) and new[-1] in stop_token_ids(model))
    return (text if cut is None else text[:cut]), ("stop" if stopped or len(new) < job.max_new else "length"), len(new)


def _cut_at_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could be the start of a stop string (a stream must not send them yet)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


# --- the app -----------------------------------------------------------------------------------------------


def make_app(engine: LanguageModel | TextClassifier, name: str, api_key: str | None = None,
             limits: Limits | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under the model id `name`."""
    limits = limits or Limits()
    app = FastAPI(title=f"llmtune: {name}", docs_url=None, redoc_url=None)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmtune-model")
    state = {"waiting": 0}
    created = int(time.time())

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable) -> Any:
        try:
            if api_key is not None and request.url.path.startswith("/v1/"):
                given = request.headers.get("authorization", "")
                token = given[7:] if given.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(token.encode(), api_key.encode()):
                    raise ApiError(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                                   "invalid_api_key")
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
                raise ApiError(413, f"The request body is {int(size):,} bytes; this server takes at most "
                                    f"{limits.max_body_bytes:,}.", "request_too_large")
        except ApiError as error:
            return error.response()
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> Any:
        return error.response()

    async def parse(request: Request, schema: type[BaseModel]) -> Any:
        body = await request.body()
        if len(body) > limits.max_body_bytes:
            raise ApiError(413, f"The request body is over {limits.max_body_bytes:,} bytes.", "request_too_large")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ApiError(400, f"The request body is not valid JSON ({error}).", "invalid_json") from None
        try:
            parsed = schema.model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise ApiError(400, f"'{where}': {first['msg']}.", "invalid_value", where) from None
        requested = getattr(parsed, "model", None)
        if requested is not None and requested != name:
            raise ApiError(404, f"The model '{requested}' is not served here; this server serves '{name}' "
                                "(GET /v1/models).", "model_not_found", "model")
        return parsed

    def check_room() -> None:
        if state["waiting"] >= limits.max_waiting:
            raise ApiError(503, f"{state['waiting']} requests are already waiting; retry shortly.", "server_busy")

    async def on_worker(work: Callable[[], Any]) -> Any:
        check_room()
        state["waiting"] += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(worker, work)
        finally:
            state["waiting"] -= 1

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "llmtune"}]}

    if isinstance(engine, TextClassifier):
        @app.post("/v1/classify")
        async def classify(request: Request) -> Any:
            body = await parse(request, ClassifyRequest)
            texts = [body.input] if isinstance(body.input, str) else body.input
            if not texts or len(texts) > limits.max_inputs:
                raise ApiError(400, f"'input' takes 1 to {limits.max_inputs} texts; got {len(texts)}.",
                               "invalid_value", "input")
            if body.pairs is not None and len(body.pairs) != len(texts):
                raise ApiError(400, f"'pairs' has {len(body.pairs)} texts for {len(texts)} inputs; give one each.",
                               "invalid_value", "pairs")
            results = await on_worker(lambda: engine.predict(texts, body.pairs))
            return {"object": "list", "model": name,
                    "data": [{"index": i, **result} for i, result in enumerate(results)]}

        return app

    lm = engine

    def job_for(body: _Sampling, prompt: str | list[dict[str, str]], chat: bool, max_new: int | None) -> _Generation:
        ids = encode_prompt(lm.tokenizer, prompt, chat).input_ids[0].tolist()
        max_new = max_new or min(limits.max_tokens, max(lm.context - len(ids), 1))
        if max_new > limits.max_tokens:
            raise ApiError(400, f"max_tokens={max_new} is above this server's limit of {limits.max_tokens} "
                                "(llmtune serve --max-tokens).", "invalid_value", "max_tokens")
        if len(ids) + max_new > lm.context:
            raise ApiError(400, f"The prompt is {len(ids)} tokens; with max_tokens={max_new} it exceeds the model's "
                                f"context of {lm.context} tokens. Shorten it or ask for fewer tokens.",
                           "context_length_exceeded", "messages" if chat else "prompt")
        return _Generation(ids, max_new, body.temperature, body.top_p, body.seed, body.stops())

    def usage(job: _Generation, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": len(job.ids), "completion_tokens": completion_tokens,
                "total_tokens": len(job.ids) + completion_tokens}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await parse(request, ChatRequest)
        if not lm.chat:
            raise ApiError(400, f"'{name}' has no chat template; use /v1/completions with a plain prompt.",
                           "no_chat_template", "messages")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
        job = job_for(body, messages, True, body.max_completion_tokens or body.max_tokens)
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            check_room()  # refused now, with a status code, rather than inside an already-started stream
            chunk = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": name}
            first = {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}]}
            pieces = _stream(job, lambda text, finish: {**chunk, "choices": [{
                "index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}, first)
            return StreamingResponse(pieces, media_type="text/event-stream")
        text, finish, produced = await on_worker(lambda: _generate(lm, job))
        return {"id": reply_id, "object": "chat.completion", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": usage(job, produced)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await parse(request, CompletionRequest)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "'prompt' takes one string here (a list of exactly one).", "invalid_value", "prompt")
        job = job_for(body, prompts[0], False, body.max_tokens)
        reply_id = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            check_room()
            chunk = {"id": reply_id, "object": "text_completion", "created": int(time.time()), "model": name}
            pieces = _stream(job, lambda text, finish: {**chunk, "choices": [{
                "index": 0, "text": text, "finish_reason": finish}]})
            return StreamingResponse(pieces, media_type="text/event-stream")
        text, finish, produced = await on_worker(lambda: _generate(lm, job))
        return {"id": reply_id, "object": "text_completion", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": usage(job, produced)}

    async def _stream(job: _Generation, shape: Callable[[str, str | None], dict], first: dict | None = None
                      ) -> AsyncIterator[str]:
        """Server-sent events: text as it is generated (never a piece of a stop string), then the finish."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(lm.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        cancel = _Cancelled()

        def work() -> tuple[str, str, int]:
            try:
                return _generate(lm, job, streamer, cancel)
            finally:
                streamer.end()  # also when generation failed: the reader below must not wait for more text

        done = asyncio.ensure_future(on_worker(work))
        sent, seen = 0, ""
        try:
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            while True:
                piece = await asyncio.to_thread(next, streamer, None)
                if piece is None:
                    break
                seen += piece
                cut = _cut_at_stop(seen, job.stops)
                ready = cut if cut is not None else len(seen) - _held_back(seen, job.stops)
                if ready > sent:
                    yield f"data: {json.dumps(shape(seen[sent:ready], None))}\n\n"
                    sent = ready
                if cut is not None:
                    break
            text, finish, _ = await done
            if len(text) > sent:  # what the streamer held back at the end (or a stop string's tail)
                yield f"data: {json.dumps(shape(text[sent:], None))}\n\n"
            yield f"data: {json.dumps(shape('', finish))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            cancel.event.set()  # the client left (or we are done): stop generating for nobody

    return app


def serve(engine: LanguageModel | TextClassifier, name: str, host: str, port: int, api_key: str | None,
          limits: Limits) -> None:
    """Run the server until Ctrl-C."""
    import uvicorn

    kind = "classifier" if isinstance(engine, TextClassifier) else (
        "causal LM, chat template" if engine.chat else "causal LM, no chat template")
    logger.info("Serving '%s' (%s) on http://%s:%d - API key %s", name, kind, host, port,
                "required" if api_key else "not required")
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("Listening on %s without an API key: anyone who can reach this port can use the model "
                       "(set LLMTUNE_API_KEY or --api-key).", host)
    uvicorn.run(make_app(engine, name, api_key, limits), host=host, port=port, log_level="info")
