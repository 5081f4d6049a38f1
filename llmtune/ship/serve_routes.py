"""The pieces `make_app` assembles: the request guard, error handlers, the model's queue and one router per family of
endpoints (/health and /v1/models, /v1/classify, /v1/chat/completions, /v1/completions)."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from llmtune.inference.generation import encode_prompt
from llmtune.inference.loading import LanguageModel
from llmtune.ship.serve_engines import Limits, TextClassifier
from llmtune.ship.serve_generation import Job, Shape, generate, stream_events
from llmtune.ship.serve_requests import (
    ApiError,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    SamplingRequest,
    parse_body,
    read_body,
)


class ModelQueue:
    """One worker thread owns the model: requests wait their turn in arrival order, at most `max_waiting` of them."""

    def __init__(self, max_waiting: int) -> None:
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmtune-model")
        self.max_waiting = max_waiting
        self.waiting = 0

    def check_room(self) -> None:
        if self.waiting >= self.max_waiting:
            raise ApiError(503, f"{self.waiting} requests are already waiting; retry shortly.", "server_busy")

    async def run(self, work: Callable[[], Any]) -> Any:
        self.check_room()
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.worker, work)
        finally:
            self.waiting -= 1


def same_secret(given: str, key: str) -> bool:
    """Compare a secret in constant time (how long it takes says nothing about how much of it matched)."""
    return hmac.compare_digest(given.encode(), key.encode())


def bearer_matches(request: Request, key: str) -> bool:
    """Whether the request carries `Authorization: Bearer KEY`."""
    given = request.headers.get("authorization", "")
    return same_secret(given[7:] if given.lower().startswith("bearer ") else "", key)


def add_guard(app: FastAPI, api_key: str | None, limits: Limits) -> None:
    """Refuse a request without the API key (compared in constant time) or with a body over the limit."""

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable) -> Any:
        try:
            if api_key is not None and request.url.path.startswith("/v1/") and not bearer_matches(request, api_key):
                raise ApiError(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                               "invalid_api_key")
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
                raise ApiError(413, f"The request body is {int(size):,} bytes; this server takes at most "
                                    f"{limits.max_body_bytes:,}.", "request_too_large")
        except ApiError as error:
            return error.response()
        return await call_next(request)


def add_error_handlers(app: FastAPI, paths: list[str]) -> None:
    """Every error in OpenAI's shape, the routing ones (404 naming the `paths` served, 405) and crashes (500) too."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> Any:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Any:
        where = f"{request.method} {request.url.path}"
        if error.status_code == 404:
            message = f"There is no {where} on this server; it answers {', '.join(paths)}."
        elif error.status_code == 405:
            message = f"{where} is not served: {request.url.path} takes {(error.headers or {}).get('Allow', 'other methods')}."
        else:
            message = str(error.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse(ApiError(error.status_code, message, code).payload(), status_code=error.status_code,
                            headers=error.headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, error: Exception) -> Any:
        # Starlette raises the error again after this answer, so the server (uvicorn) logs its traceback
        return ApiError(500, f"The server failed to answer ({type(error).__name__}); its log has the details.",
                        "internal_error").response()


async def parse(request: Request, schema: type[BaseModel], name: str, limits: Limits) -> Any:
    """The request's body as `schema`, for the model this server serves."""
    parsed = parse_body(await read_body(request, limits.max_body_bytes), schema)
    requested = getattr(parsed, "model", None)
    if requested is not None and requested != name:
        raise ApiError(404, f"The model '{requested}' is not served here; this server serves '{name}' "
                            "(GET /v1/models).", "model_not_found", "model")
    return parsed


def info_router(name: str) -> APIRouter:
    router = APIRouter()
    created = int(time.time())

    @router.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "llmtune"}]}

    return router


def classify_router(classifier: TextClassifier, name: str, limits: Limits, queue: ModelQueue) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/classify")
    async def classify(request: Request) -> Any:
        body = await parse(request, ClassifyRequest, name, limits)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > limits.max_inputs:
            raise ApiError(400, f"'input' takes 1 to {limits.max_inputs} texts; got {len(texts)}.",
                           "invalid_value", "input")
        if body.pairs is not None and len(body.pairs) != len(texts):
            raise ApiError(400, f"'pairs' has {len(body.pairs)} texts for {len(texts)} inputs; give one each.",
                           "invalid_value", "pairs")
        results = await queue.run(lambda: classifier.predict(texts, body.pairs))
        return {"object": "list", "model": name, "data": [{"index": i, **result} for i, result in enumerate(results)]}

    return router


@dataclass
class Generator:
    """What the two generation endpoints share: the model, its queue and the server's limits."""

    lm: LanguageModel
    name: str
    limits: Limits
    queue: ModelQueue

    def job(self, body: SamplingRequest, prompt: str | list[dict[str, str]], chat: bool, max_new: int | None,
            max_field: str = "max_tokens") -> Job:
        """The generation a request asks for, refused (400) where it does not fit the limits or the context."""
        ids = _encode(self.lm.tokenizer, prompt, chat)
        context, limit = self.lm.context, self.limits.max_tokens
        max_new = max_new or min(limit, max(context - len(ids), 1))
        if max_new > limit:
            raise ApiError(400, f"{max_field}={max_new} is above this server's limit of {limit} "
                                "(llmtune serve --max-tokens).", "invalid_value", max_field)
        if len(ids) + max_new > context:
            raise ApiError(400, f"The prompt is {len(ids)} tokens; with max_tokens={max_new} it exceeds the model's "
                                f"context of {context} tokens. Shorten it or ask for fewer tokens.",
                           "context_length_exceeded", "messages" if chat else "prompt")
        return Job(ids, max_new, body.temperature, body.top_p, body.seed, body.stops())

    async def whole(self, job: Job) -> tuple[str, str, int]:
        return await self.queue.run(lambda: generate(self.lm, job))

    def stream(self, job: Job, shape: Shape, first: dict | None = None) -> StreamingResponse:
        self.queue.check_room()  # refused now, with a status code, rather than inside an already-started stream
        return StreamingResponse(stream_events(self.lm, job, shape, self.queue.run, first),
                                 media_type="text/event-stream")


def _encode(tokenizer: Any, prompt: str | list[dict[str, str]], chat: bool) -> list[int]:
    if not chat:
        return encode_prompt(tokenizer, prompt, chat).input_ids[0].tolist()
    from jinja2 import TemplateError

    try:
        return encode_prompt(tokenizer, prompt, chat).input_ids[0].tolist()
    except TemplateError as error:  # a template may refuse some conversations (roles out of turn, a system message)
        raise ApiError(400, f"The model's chat template refuses these 'messages': {error}.", "invalid_value",
                       "messages") from None


def usage(job: Job, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": len(job.ids), "completion_tokens": completion_tokens,
            "total_tokens": len(job.ids) + completion_tokens}


def chat_router(generator: Generator) -> APIRouter:
    router = APIRouter()
    name = generator.name

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await parse(request, ChatRequest, name, generator.limits)
        if not generator.lm.chat:
            raise ApiError(400, f"'{name}' has no chat template; use /v1/completions with a plain prompt.",
                           "no_chat_template", "messages")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
        job = generator.job(body, messages, True, body.max_completion_tokens or body.max_tokens,
                            "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            chunk = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": name}
            first = {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}]}
            return generator.stream(job, lambda text, finish: {**chunk, "choices": [{
                "index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}, first)
        text, finish, produced = await generator.whole(job)
        return {"id": reply_id, "object": "chat.completion", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": usage(job, produced)}

    return router


def completion_router(generator: Generator) -> APIRouter:
    router = APIRouter()
    name = generator.name

    @router.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await parse(request, CompletionRequest, name, generator.limits)
        job = generator.job(body, body.text(), False, body.max_tokens)
        reply_id = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            chunk = {"id": reply_id, "object": "text_completion", "created": int(time.time()), "model": name}
            return generator.stream(job, lambda text, finish: {**chunk, "choices": [{
                "index": 0, "text": text, "finish_reason": finish}]})
        text, finish, produced = await generator.whole(job)
        return {"id": reply_id, "object": "text_completion", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": usage(job, produced)}

    return router
