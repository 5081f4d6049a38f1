"""The import contract: llmtune's rooms depend on each other in one direction only, with no circles.

Floors from top to bottom; a module may import from its own room or any floor below it, never above, and two
rooms on one floor (tasks, hub) never import each other. Imports inside functions count too: a lazy import is
still a dependency. ARCHITECTURE.md (at the top of the repository) names the rooms and why.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llmtune"

ARCHITECTURE = PACKAGE.parent / "ARCHITECTURE.md"


def floors_from_architecture_md() -> dict[str, int]:
    """room -> floor, from the table in ARCHITECTURE.md (`| floor | `room` | holds |` rows): the document is the
    contract this test enforces, so the two cannot drift apart."""
    rows = re.findall(r"^\| (\d+) \| `([\w_]+)` \|", ARCHITECTURE.read_text(), flags=re.M)
    return {room: int(floor) for floor, room in rows}


FLOORS = floors_from_architecture_md()


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@functools.cache
def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(relative.parts).removesuffix(".__init__")
        found[name] = path
    return found


def imports_of(module: str, path: Path) -> set[str]:
    """llmtune modules imported anywhere in the file (top level or inside functions)."""
    targets = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names if alias.name.startswith("llmtune")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("llmtune"):
                known = modules()
                for alias in node.names:  # `from llmtune.models import merge` imports the module llmtune.models.merge
                    name = f"{base}.{alias.name}"
                    # `from llmtune import train` is the package's lazy re-export of llmtune.api
                    targets.add(name if name in known else "llmtune.api" if base == "llmtune" else base)
    return targets


@functools.cache
def graph() -> dict[str, set[str]]:
    return {name: imports_of(name, path) - {name} for name, path in modules().items()}


def test_architecture_md_names_every_room_once_with_an_integer_floor():
    rows = re.findall(r"^\| \d+ \| `([\w_]+)` \|", ARCHITECTURE.read_text(), flags=re.M)
    assert len(rows) == len(set(rows)) >= 15, "ARCHITECTURE.md's table of rooms was not found, or names a room twice"
    rooms = {room_of(name) for name in modules()} - {"__init__"}
    assert set(FLOORS) == rooms, f"ARCHITECTURE.md and the package differ: {set(FLOORS) ^ rooms}"


def test_no_loose_modules_at_the_top_level():
    """The engine lives in packages: only the entry points and the one flow are modules of their own."""
    loose = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    assert loose == {"__main__", "api", "pipeline", "errors"}, loose


def test_every_room_has_a_floor():
    rooms = {room_of(name) for name in modules()} - {"__init__"}
    assert rooms <= set(FLOORS), f"new room(s) {rooms - set(FLOORS)}: give them a floor in this test"


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_point_down(module):
    if module == "llmtune":  # the package's lazy re-export of the API
        return
    here = room_of(module)
    for target in sorted(graph()[module]):
        there = room_of(target)
        if target == "llmtune" or there == here:
            continue
        assert FLOORS[there] < FLOORS[here], (
            f"{module} (room {here}, floor {FLOORS[here]}) imports {target} (room {there}, floor {FLOORS[there]}): "
            "imports must point to a lower floor"
        )


def test_no_import_circles():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in edges.get(node, ()):
            if target == "llmtune":
                continue
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name)


def test_the_check_itself_sees_lazy_and_relative_imports(tmp_path):
    """A back-edge hidden inside a function is still found (the contract would otherwise be toothless)."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from llmtune.cli import main\n    from . import errors\n    from llmtune import train\n")
    assert imports_of("llmtune.pipeline", source) == {"llmtune.cli", "llmtune.errors", "llmtune.api"}


def test_every_task_has_a_module_that_fills_in_the_task_protocol():
    import inspect

    from llmtune.config.vocab import TASKS
    from llmtune.tasks import TASK_MODULES, Task, task_module

    assert set(TASK_MODULES) == set(TASKS)
    for task in TASKS:
        module = task_module(task)
        for name in ("build", "validate"):
            wanted = list(inspect.signature(getattr(Task, name)).parameters)[1:]  # without self
            assert list(inspect.signature(getattr(module, name)).parameters) == wanted, (task, name)


def test_the_tokenized_cache_keys_on_the_code_of_the_load_tokenize_path():
    from llmtune.data.tokenized_cache import code_files

    names = {"/".join(path.parts[-2:]) for path in code_files()}
    assert {"tasks/causal_lm.py", "data/lm_data.py", "data/lm_tokenize.py", "data/formats.py", "models/tokenizers.py",
            "models/loading.py", "models/scratch.py"} <= names
    assert not any(name.startswith(("run/", "ship/", "observe/")) for name in names)
