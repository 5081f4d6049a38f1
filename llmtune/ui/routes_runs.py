"""The runs: list, one run (live as server-sent events), stop, resume, compare."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from llmtune.errors import LlmtuneError
from llmtune.run.files import read_json_object
from llmtune.ui import jobs
from llmtune.ui.runs import RUN_NAME, headline, history, list_runs, progress_since, run_folder, samples, summarize

if TYPE_CHECKING:
    from llmtune.ui.settings import UiSettings

POLL_SECONDS = 0.5


class CompareRequest(BaseModel):
    runs: list[str]


def runs_router(settings: UiSettings) -> APIRouter:
    router = APIRouter(prefix="/api")
    root = settings.runs

    @router.get("/runs")
    def runs() -> dict[str, Any]:
        return {"runs": [summary.as_dict() for summary in list_runs(root)], "folder": str(root)}

    @router.get("/runs/{name}")
    def run(name: str) -> dict[str, Any]:
        folder = existing_run(root, name)
        logs, offset = history(folder)
        return {"summary": summarize(root, name).as_dict(), "history": logs, "offset": offset, "log": jobs.log_tail(root, name),
                "samples": samples(folder),
                "record": read_json_object(folder / "run.json"), "metrics": read_json_object(folder / "metrics.json"),
                "job": jobs.read_job(root, name)}

    @router.get("/runs/{name}/events")
    async def events(name: str, request: Request, offset: int = 0) -> StreamingResponse:
        existing_run(root, name)  # a bad name fails now, with a status code
        resumed = request.headers.get("last-event-id", "")  # a reconnecting page carries on where it was
        offset = int(resumed) if resumed.isdigit() else offset
        return StreamingResponse(_events(root, name, request, max(offset, 0)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @router.post("/runs/{name}/stop")
    def stop(name: str) -> dict[str, Any]:
        return {"signalled": jobs.stop(root, name, existing_run(root, name))}

    @router.post("/runs/{name}/kill")
    def kill(name: str) -> dict[str, Any]:
        return {"signalled": jobs.stop(root, name, existing_run(root, name), force=True)}

    @router.post("/runs/{name}/resume")
    def resume(name: str) -> dict[str, Any]:
        return resume_run(root, name)

    @router.post("/compare")
    def compare(body: CompareRequest) -> dict[str, Any]:
        known = [name for name in body.runs if (root / name).is_dir() and RUN_NAME.fullmatch(name)]
        return {"runs": compared(root, known), "missing": [name[:80] for name in body.runs if name not in known]}

    return router


def existing_run(root: Path, name: str) -> Path:
    """The run's folder; 404 when there is neither a run nor a job of that name."""
    folder = run_folder(root, name)
    if not folder.is_dir() and jobs.read_job(root, name) is None:
        raise HTTPException(404, f"There is no run '{name}' in {root}.")
    return folder


def resume_run(root: Path, name: str) -> dict[str, Any]:
    """`llmtune train --resume` on the run's own recorded recipe (and launch), detached; refused while it runs or
    without a complete checkpoint."""
    folder = existing_run(root, name)
    summary = summarize(root, name)
    if summary.state in ("running", "starting"):
        raise LlmtuneError(f"The run '{name}' is {summary.state}; stop it before resuming it.")
    if summary.state == "finished":
        raise LlmtuneError(f"The run '{name}' has finished: there is nothing left to train. Start a new run from its "
                           "recipe (New run, 'a previous run's recipe') to train further.")
    if not summary.can_resume:
        raise LlmtuneError(f"The run '{name}' has no complete checkpoint to resume from (it is {summary.state}).")
    accelerate = (jobs.read_job(root, name) or {}).get("accelerate")  # a multi-process run resumes as one
    recipe = jobs.resume_recipe(root, folder)
    return jobs.launch(root, name, jobs.train_command(recipe, [], folder, resume=True, accelerate=accelerate),
                       recipe, [], accelerate)


def compared(root: Path, names: list[str]) -> dict[str, Any]:
    """Each run's curves and before -> after scores (the data `llmtune report A B` draws)."""
    if not names:
        raise LlmtuneError("None of the runs to compare is in the runs folder: tick runs in the Runs table.")
    out = {}
    for name in names:
        folder = existing_run(root, name)
        out[name] = {"history": history(folder)[0], "headline": headline(read_json_object(folder / "metrics.json")),
                     "summary": summarize(root, name).as_dict()}
    return out


async def _events(root: Path, name: str, request: Request, offset: int) -> AsyncIterator[str]:
    """Progress lines after byte `offset`, the run's summary and the log's tail, whenever one of them changes
    (each event's id is the offset read so far, so a reconnecting page carries on where it was)."""
    folder = run_folder(root, name)
    last_summary, last_log, last_samples, quiet = None, None, None, 0
    while not await request.is_disconnected():
        entries, offset, summary, log, newest = await asyncio.to_thread(_read_run_now, root, name, folder, offset)
        summary_key = {k: v for k, v in summary.items() if k != "duration"}
        payload: dict[str, Any] = {}
        if entries:
            payload["progress"] = entries
        if summary_key != last_summary:
            payload["summary"], last_summary = summary, summary_key
        if log != last_log:
            payload["log"], last_log = log, log
        if newest != last_samples:
            payload["samples"], last_samples = newest, newest
        if payload:
            quiet = 0
            yield f"id: {offset}\ndata: {json.dumps(payload, default=str)}\n\n"
        else:
            quiet += 1
            if quiet % 30 == 0:
                yield ": still here\n\n"  # keeps proxies from closing an idle stream
        live = summary["state"] in ("running", "starting")
        await asyncio.sleep(POLL_SECONDS if live else 4 * POLL_SECONDS)  # a finished run changes only on a Resume


def _read_run_now(root: Path, name: str, folder: Path, offset: int) -> tuple[list, int, dict, str, list]:
    """The file reads of one poll, off the event loop."""
    entries, offset = progress_since(folder, offset)
    return entries, offset, summarize(root, name).as_dict(), jobs.log_tail(root, name), samples(folder)
