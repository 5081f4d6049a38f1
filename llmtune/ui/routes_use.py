"""Try a run and ship it: chat (streamed, the run's chat template; the base model's reply beside it), classify,
export, merge, push - each through the same `llmtune.api` function the CLI calls."""

from __future__ import annotations

import asyncio
import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from llmtune.errors import LlmtuneError
from llmtune.run.files import read_json_object
from llmtune.ui.routes_runs import existing_run
from llmtune.ui.runs import run_folder

if TYPE_CHECKING:
    from llmtune.inference.loading import LanguageModel
    from llmtune.ui.settings import UiSettings


class ChatRequest(BaseModel):
    messages: list[dict[str, str]]
    base: bool = False  # the run's base model instead of the run
    max_new_tokens: int = Field(128, ge=1, le=2048)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)


class ClassifyRequest(BaseModel):
    texts: list[str] = Field(min_length=1, max_length=256)


class ExportRequest(BaseModel):
    format: str
    quant: str | None = None


class PushRequest(BaseModel):
    repo_id: str
    private: bool = False


class Models:
    """The language models loaded for chat, one worker thread for all of them; at most two stay loaded (a run and
    its base), the oldest is dropped first."""

    def __init__(self) -> None:
        from llmtune.ship.serve_routes import ModelQueue

        self.loaded: dict[str, LanguageModel] = {}
        self.queue = ModelQueue(max_waiting=8)
        self.loading = asyncio.Lock()  # two first requests for one model load it once

    async def get(self, path: str) -> LanguageModel:
        async with self.loading:
            if path not in self.loaded:
                from llmtune.inference.loading import load_language_model

                while len(self.loaded) >= 2:  # dropped before the next loads: two models at most, even at the peak
                    self.loaded.pop(next(iter(self.loaded)))
                self.loaded[path] = await self.queue.run(lambda: load_language_model(path, "ui chat"))
            return self.loaded[path]


def chat_job(lm: LanguageModel, body: ChatRequest) -> Any:
    """The generation job of one chat request, as `llmtune serve` makes it: the run's chat template, the prompt
    checked against the model's context."""
    from jinja2 import TemplateError

    from llmtune.inference.generation import encode_prompt
    from llmtune.ship.serve_generation import Job

    prompt = body.messages if lm.chat else body.messages[-1]["content"]
    try:
        ids = encode_prompt(lm.tokenizer, prompt, lm.chat).input_ids[0].tolist()
    except TemplateError as error:
        raise LlmtuneError(f"The model's chat template refuses this conversation: {error}.") from None
    if len(ids) + body.max_new_tokens > lm.context:
        raise LlmtuneError(f"The conversation is {len(ids)} tokens; with max_new_tokens={body.max_new_tokens} it "
                           f"exceeds the model's context of {lm.context} tokens. Start a new chat or ask for fewer.")
    return Job(ids, body.max_new_tokens, body.temperature, body.top_p, body.seed, [])


def base_model_path(folder: Path) -> str:
    record = read_json_object(folder / "run.json")
    path = record.get("model_path") or (record.get("recipe", {}).get("model") or {}).get("name")
    if not path:
        raise LlmtuneError(f"The run in '{folder}' does not record its base model (run.json model_path).")
    return str(path)


def use_router(settings: UiSettings) -> APIRouter:
    router = APIRouter(prefix="/api/runs/{name}")
    models = Models()
    root = settings.runs

    @router.post("/chat")
    async def chat(name: str, body: ChatRequest) -> StreamingResponse:
        from llmtune.ship.serve_generation import stream_events

        folder = existing_run(root, name)
        if not body.messages or any(set(m) != {"role", "content"} for m in body.messages) or \
                body.messages[-1]["role"] != "user":
            raise LlmtuneError("messages must be a list of {role, content}, the last one the user's.")
        lm = await models.get(base_model_path(folder) if body.base else str(folder))
        job = chat_job(lm, body)
        models.queue.check_room()
        return StreamingResponse(stream_events(lm, job, lambda text, finish: {"text": text, "finish": finish},
                                               models.queue.run, {"chat_template": lm.chat}),
                                 media_type="text/event-stream")

    @router.post("/classify")
    def classify(name: str, body: ClassifyRequest) -> dict[str, Any]:
        from llmtune import api

        return {"predictions": api.predict(existing_run(root, name), body.texts)}

    @router.post("/export")
    def export(name: str, body: ExportRequest) -> dict[str, Any]:
        from llmtune import api

        folder = existing_run(root, name)
        result = api.export(folder, body.format, body.quant)
        command = ["llmtune", "export", str(folder), "--format", body.format] + (["--quant", body.quant] if body.quant else [])
        files = [str(f) for p in result.files for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
        return {"files": files, "checks": json.loads(json.dumps(result.checks, default=str)),
                "command": shlex.join(command)}

    @router.post("/merge")
    def merge(name: str) -> dict[str, Any]:
        from llmtune import api

        folder = existing_run(root, name)
        out = run_folder(root, f"{name}-merged")
        result = api.merge(folder, out)
        return {"out": str(result.out), "base": result.base, "max_logit_difference": result.max_logit_difference,
                "command": shlex.join(["llmtune", "merge", str(folder), "--out", str(out)])}

    @router.post("/push")
    def push(name: str, body: PushRequest) -> dict[str, Any]:
        from llmtune import api

        folder = existing_run(root, name)
        url = api.push(folder, body.repo_id, body.private)
        return {"url": url, "command": shlex.join(["llmtune", "push", str(folder), "--repo-id", body.repo_id]
                                                  + (["--private"] if body.private else []))}

    return router
