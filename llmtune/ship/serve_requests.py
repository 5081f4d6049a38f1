"""What `llmtune serve` accepts: request bodies as pydantic models, and the errors it answers with (OpenAI's shape).

Every field a request may carry is bounded here, so that a bad request is refused with a 400 naming the field before
any work starts - above all before a stream has begun, after which no status code can be sent.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# OpenAI's API documents seed as an int64. torch.manual_seed takes -2**63 .. 2**64-1, but a negative seed n seeds as
# 2**64 + n, so the int64 range is the widest one in which different seeds stay different samples.
SEED_MIN, SEED_MAX = -2**63, 2**63 - 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def payload(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                503: "server_busy"}.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "code": self.code, "param": self.param}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status)


# --- the bodies ----------------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields this server does not use (user, logprobs...)


class SamplingRequest(_Request):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _few_and_not_empty(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("must be up to 4 non-empty strings")
        return stop

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class _TextPart(_Request):
    type: str
    text: str

    @field_validator("type")
    @classmethod
    def _only_text(cls, kind: str) -> str:
        if kind != "text":
            raise ValueError("must be 'text': this server runs a text model, so it takes no image, audio or file parts")
        return kind


class _Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingRequest):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("must be one string here (or a list of exactly one)")
        return prompt

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ClassifyRequest(_Request):
    model: str | None = None
    input: str | list[str]
    pairs: list[str] | None = None


# --- reading a request -----------------------------------------------------------------------------------------


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused once it passes `max_bytes` (a chunked body has no length to check beforehand)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ApiError(413, f"The request body is over {max_bytes:,} bytes.", "request_too_large")
    return bytes(body)


def parse_body(body: bytes, schema: type[BaseModel]) -> Any:
    """`body` as a `schema`, or an ApiError (400) naming the first bad field, its value and what would be valid."""
    try:
        data = json.loads(body, parse_constant=_not_json)
    except (ValueError, RecursionError) as error:  # also bad UTF-8, 5,000-digit numbers and nesting too deep to read
        reason = "it is nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise ApiError(400, f"The request body is not valid JSON ({reason}).", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"The request body must be a JSON object of fields; got {_shown(data)}.", "invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        raise _first_problem(error, data) from None


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON number")  # Python's json reads NaN and Infinity; JSON has neither


def _first_problem(error: ValidationError, data: Any) -> ApiError:
    """The deepest problem: a union (content, stop, prompt) fails in each of its branches, and the branch that got
    furthest is the one the client meant. Problems at that same field are joined ("a string, or a list")."""
    problems = [(_where(problem["loc"], data, problem["type"] == "missing"), problem) for problem in error.errors()]
    deepest = max(len(where) for where, _ in problems)
    where = next(where for where, _ in problems if len(where) == deepest)
    name = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in where).lstrip(".")
    reasons = [_reason(problem) for at, problem in problems if at == where]
    first = next(problem for at, problem in problems if at == where)
    if first["type"] == "missing":
        return ApiError(400, f"'{name}' is required and missing.", "invalid_value", name)
    return ApiError(400, f"'{name}' is {_shown(first['input'])}: it {', or '.join(dict.fromkeys(reasons))}.",
                    "invalid_value", name)


def _where(loc: tuple[int | str, ...], data: Any, missing: bool) -> list[int | str]:
    """The path a client wrote, from pydantic's location: that names union branches too ('str', 'list[str]'), which
    are told apart from fields by walking the request itself."""
    where: list[int | str] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, list) and isinstance(part, int) and part < len(node):
            where.append(part)
            node = node[part]
        elif isinstance(node, dict) and part in node:
            where.append(part)
            node = node[part]
        elif missing and i == len(loc) - 1:
            where.append(part)
    return where


def _reason(problem: dict[str, Any]) -> str:
    if problem["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return "should be a JSON object"
    if problem["type"] in ("too_short", "too_long"):  # pydantic says "List should have ... after validation"
        bound = problem["ctx"]["min_length" if problem["type"] == "too_short" else "max_length"]
        return f"should have {'at least' if problem['type'] == 'too_short' else 'at most'} {bound} item(s)"
    message = problem["msg"].removeprefix("Value error, ").removeprefix("Input ")  # "Input should be ..."
    return message if message.startswith(("should", "must")) else f"is not valid ({message})"


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
