"""A new run: the recipes, the form (from the schema), checking it, `plan`, the data preview, and launching."""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from pydantic import BaseModel

from llmtune.config.loader import load_recipe
from llmtune.config.schema import Recipe
from llmtune.config.vocab import TASKS
from llmtune.errors import LlmtuneError
from llmtune.run.files import write_text
from llmtune.ui import forms, jobs
from llmtune.ui.runs import run_folder

if TYPE_CHECKING:
    from llmtune.ui.settings import UiSettings


class FormRequest(BaseModel):
    recipe: str  # a recipe file under the recipes folder, or "run:NAME" for a previous run's recipe
    values: dict[str, str] = {}
    name: str | None = None  # the new run's folder name (default: the recipe's name and the time)
    accelerate: str | None = None  # one of llmtune's accelerate configs (default: one process)


def planned_run(settings: UiSettings, body: FormRequest) -> dict[str, Any]:
    """The form checked, and what Launch would run: the run's folder, the command, the recipe as it will train."""
    path, shown = recipe_file(settings, body.recipe)
    jobs.check_accelerate(body.accelerate)
    checked = forms.check(path, body.values)
    name = body.name or f"{path.stem.removesuffix('.resume')}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = run_folder(settings.runs, name)
    command = jobs.train_command(shown, checked["overrides"], folder, accelerate=body.accelerate or None)
    return {**checked, "name": name, "folder": folder, "shown": shown, "command": shlex.join(command), "argv": command,
            "yaml": forms.recipe_yaml(path, [*checked["overrides"], f"output.dir={folder}"])}


def recipe_file(settings: UiSettings, name: str) -> tuple[Path, str]:
    """(the file, how a command line names it) for a recipe under the recipes folder or a previous run's recipe;
    nothing outside those folders is read."""
    if name.startswith("task:"):  # a blank recipe of one task: the form shows every default, and what is missing
        task = name[5:]
        if task not in TASKS:
            raise LlmtuneError(f"'{task}' is not a task; one of {', '.join(TASKS)}.")
        path = jobs.jobs_folder(settings.runs) / "templates" / f"{task}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, f"task: {task}\n")
        return path, _shown(path)
    if name.startswith("run:"):
        path = jobs.resume_recipe(settings.runs, run_folder(settings.runs, name[4:]))
        return Path(path), _shown(Path(path))
    path = (settings.recipes / name).resolve()
    if not path.is_relative_to(settings.recipes) or path.suffix not in (".yaml", ".yml") or not path.is_file():
        raise LlmtuneError(f"'{name}' is not a recipe in {settings.recipes}; pick one of the listed .yaml files.")
    return path, _shown(path)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def new_run_router(settings: UiSettings) -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.get("/recipes")
    def recipes() -> dict[str, Any]:
        found = sorted(str(p.relative_to(settings.recipes)) for p in settings.recipes.rglob("*.y*ml")
                       if p.suffix in (".yaml", ".yml") and "data" not in p.relative_to(settings.recipes).parts[:-1])
        return {"recipes": found, "folder": str(settings.recipes), "accelerate": jobs.accelerate_configs(),
                "tasks": list(TASKS)}

    @router.get("/schema")
    def schema() -> dict[str, Any]:
        return {"fields": forms.schema_fields()}

    @router.post("/form")
    def form(body: FormRequest) -> dict[str, Any]:
        path, _ = recipe_file(settings, body.recipe)
        return {"values": forms.recipe_values(path)}

    @router.post("/check")
    def check(body: FormRequest) -> dict[str, Any]:
        planned = planned_run(settings, body)
        return {key: planned[key] for key in ("errors", "general", "overrides", "name", "command", "yaml")}

    @router.post("/launch")
    def launch(body: FormRequest) -> dict[str, Any]:
        planned = planned_run(settings, body)
        problems = list(planned["errors"].values()) + planned["general"]
        if problems:
            raise LlmtuneError(problems[0])
        name, folder = planned["name"], planned["folder"]
        if folder.exists() or jobs.read_job(settings.runs, name):
            raise LlmtuneError(f"A run named '{name}' already exists in {settings.runs}; choose another name.")
        return jobs.launch(settings.runs, name, planned["argv"], planned["shown"], planned["overrides"],
                           body.accelerate or None)

    return router


def form_recipe(settings: UiSettings, body: FormRequest) -> Recipe:
    """The recipe the form describes: the chosen recipe file with the form's changes applied."""
    path, _ = recipe_file(settings, body.recipe)
    return load_recipe(path, forms.overrides_for(path, body.values))


def recipe_tools_router(settings: UiSettings) -> APIRouter:
    """What the CLI does with a recipe before training it: validate, plan, data preview."""
    router = APIRouter(prefix="/api")

    @router.post("/plan")
    def plan(body: FormRequest) -> dict[str, Any]:
        from llmtune import api
        from llmtune.observe.plan import format_plan

        result = api.plan(form_recipe(settings, body), dry_run=False)
        return {"text": format_plan(result), "plan": dataclasses.asdict(result)}

    @router.post("/validate")
    def validate(body: FormRequest) -> dict[str, Any]:
        """`llmtune validate`: the model resolves, the data loads and tokenizes - nothing is trained."""
        from llmtune import api

        summary = api.validate(form_recipe(settings, body))
        return {"summary": json.loads(json.dumps(summary, default=str))}

    @router.post("/preview")
    def preview(body: FormRequest) -> dict[str, Any]:
        from llmtune import api

        return {"text": api.preview(form_recipe(settings, body), samples=3, colour=False)}

    return router
