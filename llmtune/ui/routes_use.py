"""Try a run and ship it: chat (streamed, the run's chat template; the base model's reply beside it), classify,
export, merge, push - each through the same `llmtune.api` function the CLI calls."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from llmtune.errors import LlmtuneError
from llmtune.ui.runs import read_dict, run_folder

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

    async def get(self, path: str) -> LanguageModel:
        if path not in self.loaded:
            from llmtune.inference.loading import load_language_model

            model = await self.queue.run(lambda: load_language_model(path, "ui chat"))
            while len(self.loaded) >= 2:
                self.loaded.pop(next(iter(self.loaded)))
            self.loaded[path] = model
        return self.loaded[path]


def base_model_path(folder: Path) -> str:
    record = read_dict(folder / "run.json")
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
        from llmtune.inference.generation import encode_prompt
        from llmtune.ship.serve_generation import Job, stream_events

        folder = run_folder(root, name)
        lm = await models.get(base_model_path(folder) if body.base else str(folder))
        if not body.messages or any(set(m) != {"role", "content"} for m in body.messages):
            raise LlmtuneError("messages must be a list of {role, content}, the last one the user's.")
        prompt = body.messages if lm.chat else body.messages[-1]["content"]
        ids = encode_prompt(lm.tokenizer, prompt, lm.chat).input_ids[0].tolist()
        job = Job(ids, body.max_new_tokens, body.temperature, body.top_p, body.seed, [])
        models.queue.check_room()
        return StreamingResponse(stream_events(lm, job, lambda text, finish: {"text": text, "finish": finish},
                                               models.queue.run, {"chat_template": lm.chat}),
                                 media_type="text/event-stream")

    @router.post("/classify")
    def classify(name: str, body: ClassifyRequest) -> dict[str, Any]:
        from llmtune import api

        return {"predictions": api.predict(run_folder(root, name), body.texts)}

    @router.post("/export")
    def export(name: str, body: ExportRequest) -> dict[str, Any]:
        from llmtune import api

        folder = run_folder(root, name)
        result = api.export(folder, body.format, body.quant)
        command = ["llmtune", "export", str(folder), "--format", body.format] + (["--quant", body.quant] if body.quant else [])
        files = [str(f) for p in result.files for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
        return {"files": files, "checks": json.loads(json.dumps(result.checks, default=str)),
                "command": shlex.join(command)}

    @router.post("/merge")
    def merge(name: str) -> dict[str, Any]:
        from llmtune import api

        folder = run_folder(root, name)
        out = run_folder(root, f"{name}-merged")
        result = api.merge(folder, out)
        return {"out": str(result.out), "base": result.base, "max_logit_difference": result.max_logit_difference,
                "command": shlex.join(["llmtune", "merge", str(folder), "--out", str(out)])}

    @router.post("/push")
    def push(name: str, body: PushRequest) -> dict[str, Any]:
        from llmtune import api

        folder = run_folder(root, name)
        url = api.push(folder, body.repo_id, body.private)
        return {"url": url, "command": shlex.join(["llmtune", "push", str(folder), "--repo-id", body.repo_id]
                                                  + (["--private"] if body.private else []))}

    return router
